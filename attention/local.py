"""Sliding-window and strided patterns, computed on blocks (no n x n score tensor).

  local        Sliding window, abs(i - j) <= window (Parmar et al. 2018; Child et al. 2019's
               local part): each query block of c positions attends to the key blocks that
               cover its window (banded chunks), O(n * window).
  strided      Atrous/dilated, (i - j) mod stride == 0 (Child et al. 2019, the strided part):
               a reshape puts each residue class mod stride in its own group, then dense
               attention within groups, O(n^2 / stride).
  sparse       local | strided in one softmax (Child et al. 2019, "strided" pattern), each
               pair counted once: band part + strided part restricted to abs(i - j) > window,
               merged exactly. O(n * window + n^2 / stride).
  sparse_fixed Child et al. 2019, "fixed" pattern (Eq. A(1) | A(2)): own block of block_size,
               plus the last `summary` positions of every block. Own-block part + shared
               summary keys (other blocks only): O(n * block_size + n^2 * summary / block_size).
  longformer   Beltagy et al. 2020: sliding window abs(i - j) <= window plus global tokens
               (the first num_global positions see and are seen by all). Band part + shared
               global keys for ordinary queries, dense rows for the global queries; O(n *
               (window + num_global)).
               Deviation (docs/faithfulness.md): global attention uses the same q, k, v
               projections as the window; the paper has separate global projections.

The predicates are attention/patterns.py's, applied to the positions of the gathered keys.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention import patterns, register
from attention._blocks import (
    dropout_keys, heads_first, kv_mask_or_ones, merge, merge_axes, neighbours, pad_axis,
    pair_mask, partial_attention, round_up, to_blocks)
from attention._util import check_causal, check_int, check_qkv, int_or_sqrt


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


def _unblock(x):
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


@register(
    "local",
    defaults={"window": 50},
    supports_causal=True,
    complexity="O(n)",
    doc="Sliding-window attention abs(i - j) <= window on banded blocks (Parmar et al. 2018)",
    supports_dropout=True,
)
def local_attention(q, k, v, *, kv_mask=None, causal=False, window=50, dropout_rate=0.0,
                    dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
    check_int("local", "window", window, 0)
    qh, kh, vh, kvm = prepare("local", q, k, v, kv_mask, causal)
    qb, kb, vb, kvb, pos_q, pos_k = band(qh, kh, vh, kvm, window=window, causal=causal)
    keep = lambda i, j: patterns.local(i, j, window=window)  # noqa: E731
    part = partial_attention(qb, [(kb, vb, pair_mask(keep, pos_q, pos_k, kvb, causal))],
                             dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return finish(_unblock(merge(part)), q.shape[1], v.dtype)


@register(
    "strided",
    defaults={"stride": 64},
    supports_causal=True,
    complexity="O(n^2/s)",
    doc="Strided (atrous) attention (i - j) mod stride == 0 by residue-class reshape "
        "(Child et al. 2019)",
    supports_dropout=True,
)
def strided_attention(q, k, v, *, kv_mask=None, causal=False, stride=64, dropout_rate=0.0,
                      dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv].
    stride="sqrt": ceil(sqrt(n)), n = max(Tq, Tk) (the padded length)."""
    check_qkv("strided", q, k, v, kv_mask)
    stride = int_or_sqrt("strided", "stride", stride, 1, max(q.shape[1], k.shape[1]))
    qh, kh, vh, kvm = prepare("strided", q, k, v, kv_mask, causal)
    keep = lambda i, j: patterns.strided(i, j, stride=stride)  # noqa: E731
    part = strided_part(qh, kh, vh, kvm, stride=stride, keep=keep, causal=causal,
                        dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return finish(merge(part), q.shape[1], v.dtype)


@register(
    "sparse",
    defaults={"window": 32, "stride": 64},
    supports_causal=True,
    complexity="O(n^2/s)",
    doc="Sparse Transformer strided pattern: local window | (i - j) mod stride == 0 in one "
        "softmax (Child et al. 2019)",
    supports_dropout=True,
)
def sparse_attention(q, k, v, *, kv_mask=None, causal=False, window=32, stride=64,
                     dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv].
    window / stride "sqrt": ceil(sqrt(n)), n = max(Tq, Tk) (the padded length): Child et al.'s
    l = sqrt(n), O(n sqrt n)."""
    check_qkv("sparse", q, k, v, kv_mask)
    n = max(q.shape[1], k.shape[1])
    window = int_or_sqrt("sparse", "window", window, 0, n)
    stride = int_or_sqrt("sparse", "stride", stride, 1, n)
    qh, kh, vh, kvm = prepare("sparse", q, k, v, kv_mask, causal)
    keys = dropout_keys(dropout_rate, dropout_rng, 2)
    local = lambda i, j: patterns.local(i, j, window=window)  # noqa: E731
    # Band part: the pairs with abs(i - j) <= window (all kept by the pattern).
    qb, kb, vb, kvb, pos_q, pos_k = band(qh, kh, vh, kvm, window=window, causal=causal)
    near = partial_attention(qb, [(kb, vb, pair_mask(local, pos_q, pos_k, kvb, causal))],
                             dropout_rate=dropout_rate, dropout_rng=keys[0]).map(_unblock)
    # Strided part: the rest of the pattern, abs(i - j) > window, so no pair counts twice.
    rest = lambda i, j: (patterns.sparse(i, j, window=window, stride=stride)  # noqa: E731
                         & ~local(i, j))
    far = strided_part(qh, kh, vh, kvm, stride=stride, keep=rest, causal=causal,
                       dropout_rate=dropout_rate, dropout_rng=keys[1])
    n = max(q.shape[1], k.shape[1])
    out = merge(near.map(lambda x: x[:, :, :n]), far.map(lambda x: x[:, :, :n]))
    return finish(out, q.shape[1], v.dtype)


@register(
    "sparse_fixed",
    defaults={"block_size": 128, "summary": 32},
    supports_causal=True,
    complexity="O(n^2/s)",
    doc="Sparse Transformer fixed pattern: own block | last `summary` positions of every "
        "block (Child et al. 2019)",
    supports_dropout=True,
)
def sparse_fixed_attention(q, k, v, *, kv_mask=None, causal=False, block_size=128, summary=32,
                           dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
    check_int("sparse_fixed", "block_size", block_size, 1)
    check_int("sparse_fixed", "summary", summary, 0)
    if summary > block_size:
        raise ValueError(f"sparse_fixed: summary must be <= block_size ({block_size}); "
                         f"got {summary}")
    qh, kh, vh, kvm = prepare("sparse_fixed", q, k, v, kv_mask, causal)
    b = block_size
    keep = lambda i, j: patterns.sparse_fixed(i, j, block_size=b, summary=summary)  # noqa: E731
    n_pad = round_up(max(q.shape[1], k.shape[1]), b)

    def blocks(x, axis, fill=0):
        return to_blocks(pad_axis(x, axis, n_pad, fill), b, axis)

    qb, kb, vb = blocks(qh, 2), blocks(kh, 2), blocks(vh, 2)  # [B, H, nb, b, D]
    kvb = blocks(kvm, 1, False)  # [B, nb, b]
    pos = blocks(np.arange(n_pad), 0)  # [nb, b]
    groups = [(kb, vb, pair_mask(keep, pos, pos, kvb, causal))]
    if summary > 0:
        # The summary positions of every block, shared by all query blocks; pairs in the
        # query's own block are already in the own-block group.
        ks, vs = _unblock(kb[:, :, :, b - summary:]), _unblock(vb[:, :, :, b - summary:])
        pos_s = pos[:, b - summary:].reshape(-1)
        kv_s = merge_axes(kvb[:, :, b - summary:], 1)
        other = lambda i, j: keep(i, j) & (i // b != j // b)  # noqa: E731
        groups.append((ks, vs, pair_mask(other, pos, pos_s, kv_s, causal)))
    part = partial_attention(qb, groups, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return finish(_unblock(merge(part)), q.shape[1], v.dtype)


@register(
    "longformer",
    defaults={"window": 256, "num_global": 1},
    supports_causal=True,
    complexity="O(n)",
    doc="Longformer: sliding window abs(i - j) <= window + num_global global tokens "
        "(Beltagy et al. 2020)",
    supports_dropout=True,
)
def longformer_attention(q, k, v, *, kv_mask=None, causal=False, window=256, num_global=1,
                         dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
    check_int("longformer", "window", window, 0)
    check_int("longformer", "num_global", num_global, 0)
    qh, kh, vh, kvm = prepare("longformer", q, k, v, kv_mask, causal)
    keep = lambda i, j: patterns.longformer(i, j, window=window, num_global=num_global)  # noqa
    keys = dropout_keys(dropout_rate, dropout_rng, 2)
    g = min(num_global, k.shape[1])
    # Ordinary queries: the band keys that are not global, plus the global keys.
    qb, kb, vb, kvb, pos_q, pos_k = band(qh, kh, vh, kvm, window=window, causal=causal)
    not_global = lambda i, j: keep(i, j) & (j >= g)  # noqa: E731
    groups = [(kb, vb, pair_mask(not_global, pos_q, pos_k, kvb, causal))]
    if g > 0:
        groups.append((kh[:, :, :g], vh[:, :, :g],
                       pair_mask(keep, pos_q, np.arange(g), kvm[:, :g], causal)))
    part = partial_attention(qb, groups, dropout_rate=dropout_rate, dropout_rng=keys[0])
    out = _unblock(merge(part))  # [B, H, N, Dv]
    gq = min(num_global, q.shape[1])
    if gq > 0:
        # Global queries see every key: dense rows, O(num_global * n).
        mask = pair_mask(keep, np.arange(gq)[None], np.arange(k.shape[1]), kvm, causal)
        rows = partial_attention(qh[:, :, None, :gq], [(kh, vh, mask)],
                                 dropout_rate=dropout_rate, dropout_rng=keys[1])
        out = out.at[:, :, :gq].set(merge(rows)[:, :, 0])
    return finish(out, q.shape[1], v.dtype)
