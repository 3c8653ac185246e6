"""Blocked machinery of the sliding-window and strided patterns (local, strided, sparse,
sparse_fixed, longformer): banded key blocks around each query block, residue classes mod a
stride, contract checks and the head-major layout. No n x n score tensor anywhere."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention._blocks import (
    heads_first, kv_mask_or_ones, merge_axes, neighbours, pad_axis, pair_mask,
    partial_attention, round_up, to_blocks)
from attention._util import check_causal, check_qkv


def band_block(window: int) -> int:
    """Query block size c of the banded computation: the power of two >= window, in [16, 128].

    Each query block then reads 2 * ceil(window / c) + 1 key blocks (3 for window <= 128);
    measured on CPU, power-of-two blocks are markedly faster than c = window (e.g. 50).
    """
    c = 16
    while c < min(window, 128):
        c *= 2
    return c


def band(qh, kh, vh, kvm, *, window: int, causal: bool):
    """Query blocks and the neighbouring key blocks that cover abs(i - j) <= window.

    qh: [B, H, Tq, D]; kh, vh: [B, H, Tk, D]; kvm: bool [B, Tk]. Returns qb [B, H, nb, c, D],
    kb/vb [B, H, nb, K, D], kvb bool [B, nb, K], positions pos_q [nb, c] and pos_k [nb, K]
    (-1 outside the sequence).
    """
    c = band_block(window)
    n_pad = round_up(max(qh.shape[2], kh.shape[2]), c)
    reach = -(-window // c)  # neighbouring blocks each side
    before, after = reach, (0 if causal else reach)

    def blocks(x, axis, fill=0):
        return to_blocks(pad_axis(x, axis, n_pad, fill), c, axis)

    qb = blocks(qh, 2)
    kb = neighbours(blocks(kh, 2), before, after, axis=2)
    vb = neighbours(blocks(vh, 2), before, after, axis=2)
    kvb = neighbours(blocks(kvm, 1, False), before, after, axis=1, fill=False)
    pos_q = blocks(np.arange(n_pad), 0)
    pos_k = neighbours(pos_q, before, after, axis=0, fill=-1)
    return qb, kb, vb, kvb, pos_q, pos_k


def unblock(x):
    """[B, H, nb, c, ...] -> [B, H, nb * c, ...]."""
    return merge_axes(x, 2)


def strided_part(qh, kh, vh, kvm, *, stride: int, keep, causal: bool, dropout_rate,
                 dropout_rng):
    """Residue classes mod stride as groups, dense attention within each.

    -> Partial with o [B, H, N, Dv], m/l [B, H, N] (N = length rounded up to the stride).
    """
    n_pad = round_up(max(qh.shape[2], kh.shape[2]), stride)

    def group(x, axis, fill=0):  # [.., N, ..] -> [.., stride, N // stride, ..]
        x = to_blocks(pad_axis(x, axis, n_pad, fill), stride, axis)
        return x.swapaxes(axis, axis + 1)

    def ungroup(x):  # [B, H, stride, N // stride, ...] -> [B, H, N, ...]
        return merge_axes(jnp.swapaxes(x, 2, 3), 2)

    pos = group(np.arange(n_pad), 0)  # [stride, N // stride]
    mask = pair_mask(keep, pos, pos, group(kvm, 1, False), causal)
    part = partial_attention(group(qh, 2), [(group(kh, 2), group(vh, 2), mask)],
                             dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return part.map(ungroup)


def prepare(name, q, k, v, kv_mask, causal, supports_causal=True):
    """Checks the contract; -> head-major q, k, v [B, H, T, D] and kv_mask bool [B, Tk]."""
    check_qkv(name, q, k, v, kv_mask)
    check_causal(name, causal, supports_causal, q.shape[1], k.shape[1])
    kvm = kv_mask_or_ones(kv_mask, k.shape[0], k.shape[1])
    return heads_first(q), heads_first(k), heads_first(v), kvm


def finish(out, q_len, dtype):
    """[B, H, N, Dv] float32 -> [B, q_len, H, Dv] in dtype."""
    return heads_first(out[:, :, :q_len]).astype(dtype)
