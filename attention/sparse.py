"""Sparse Transformer patterns (Child et al. 2019), computed on blocks.

  sparse       local | strided in one softmax (the "strided" pattern), each pair counted once:
               band part + strided part restricted to abs(i - j) > window, merged exactly.
               O(n * window + n^2 / stride).
  sparse_fixed the "fixed" pattern (Eq. A(1) | A(2)): own block of block_size, plus the last
               `summary` positions of every block. Own-block part + shared summary keys
               (other blocks only): O(n * block_size + n^2 * summary / block_size).
"""

from __future__ import annotations

import numpy as np

from attention import Int, patterns, register
from attention._banded import band, finish, prepare, strided_part, unblock
from attention._blocks import (
    dropout_keys, merge, merge_axes, pad_axis, pair_mask, partial_attention, round_up,
    to_blocks)
from attention._util import check_qkv, or_sqrt


@register("sparse", supports_causal=True, complexity="O(n^2/s)", supports_dropout=True,
          hparams={"window": Int(32, min=0, sqrt=True), "stride": Int(64, min=1, sqrt=True)},
          doc="Sparse Transformer strided pattern: local window | (i - j) mod stride == 0 in one "
              "softmax (Child et al. 2019)")
def sparse_attention(q, k, v, *, kv_mask=None, causal=False, window, stride,
                     dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv].
    window / stride "sqrt": ceil(sqrt(n)), n = max(Tq, Tk) (the padded length): Child et al.'s
    l = sqrt(n), O(n sqrt n)."""
    check_qkv("sparse", q, k, v, kv_mask)
    n = max(q.shape[1], k.shape[1])
    window, stride = or_sqrt(window, n), or_sqrt(stride, n)
    qh, kh, vh, kvm = prepare("sparse", q, k, v, kv_mask, causal)
    keys = dropout_keys(dropout_rate, dropout_rng, 2)
    local = lambda i, j: patterns.local(i, j, window=window)  # noqa: E731
    # Band part: the pairs with abs(i - j) <= window (all kept by the pattern).
    qb, kb, vb, kvb, pos_q, pos_k = band(qh, kh, vh, kvm, window=window, causal=causal)
    near = partial_attention(qb, [(kb, vb, pair_mask(local, pos_q, pos_k, kvb, causal))],
                             dropout_rate=dropout_rate, dropout_rng=keys[0]).map(unblock)
    # Strided part: the rest of the pattern, abs(i - j) > window, so no pair counts twice.
    rest = lambda i, j: (patterns.sparse(i, j, window=window, stride=stride)  # noqa: E731
                         & ~local(i, j))
    far = strided_part(qh, kh, vh, kvm, stride=stride, keep=rest, causal=causal,
                       dropout_rate=dropout_rate, dropout_rng=keys[1])
    n = max(q.shape[1], k.shape[1])
    out = merge(near.map(lambda x: x[:, :, :n]), far.map(lambda x: x[:, :, :n]))
    return finish(out, q.shape[1], v.dtype)


def _summary_in_block(block_size, summary):
    if summary > block_size:
        return f"summary must be <= block_size ({block_size}); got {summary}"
    return None


@register("sparse_fixed", supports_causal=True, complexity="O(n^2/s)", supports_dropout=True,
          constraint=lambda hp: _summary_in_block(**hp),
          hparams={"block_size": Int(128, min=1), "summary": Int(32, min=0)},
          doc="Sparse Transformer fixed pattern: own block | last `summary` positions of every "
              "block (Child et al. 2019)")
def sparse_fixed_attention(q, k, v, *, kv_mask=None, causal=False, block_size, summary,
                           dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
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
        ks, vs = unblock(kb[:, :, :, b - summary:]), unblock(vb[:, :, :, b - summary:])
        pos_s = pos[:, b - summary:].reshape(-1)
        kv_s = merge_axes(kvb[:, :, b - summary:], 1)
        other = lambda i, j: keep(i, j) & (i // b != j // b)  # noqa: E731
        groups.append((ks, vs, pair_mask(other, pos, pos_s, kv_s, causal)))
    part = partial_attention(qb, groups, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return finish(unblock(merge(part)), q.shape[1], v.dtype)
