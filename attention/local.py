"""Sliding-window attention, abs(i - j) <= window (Parmar et al. 2018; Child et al. 2019's
local part): each query block of c positions attends to the key blocks that cover its window
(banded chunks), O(n * window). The predicate is attention/patterns.py's, applied to the
positions of the gathered keys.
"""

from __future__ import annotations

from attention import Int, patterns, register
from attention._banded import band, finish, prepare, unblock
from attention._blocks import merge, pair_mask, partial_attention


@register("local", supports_causal=True, complexity="O(n)", supports_dropout=True,
          hparams={"window": Int(50, min=0)},
          doc="Sliding-window attention abs(i - j) <= window on banded blocks (Parmar et al. 2018)")
def local_attention(q, k, v, *, kv_mask=None, causal=False, window, dropout_rate=0.0,
                    dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
    qh, kh, vh, kvm = prepare("local", q, k, v, kv_mask, causal)
    qb, kb, vb, kvb, pos_q, pos_k = band(qh, kh, vh, kvm, window=window, causal=causal)
    keep = lambda i, j: patterns.local(i, j, window=window)  # noqa: E731
    part = partial_attention(qb, [(kb, vb, pair_mask(keep, pos_q, pos_k, kvb, causal))],
                             dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return finish(unblock(merge(part)), q.shape[1], v.dtype)
