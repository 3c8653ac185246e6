"""Longformer (Beltagy et al. 2020): sliding window abs(i - j) <= window plus global tokens
(the first num_global positions see and are seen by all). Band part + shared global keys for
ordinary queries, dense rows for the global queries; O(n * (window + num_global)).
Deviation (docs/faithfulness.md): global attention uses the same q, k, v projections as the
window; the paper has separate global projections.
"""

from __future__ import annotations

import numpy as np

from attention import Int, patterns, register
from attention._banded import band, finish, prepare, unblock
from attention._blocks import dropout_keys, merge, pair_mask, partial_attention


@register("longformer", supports_causal=True, complexity="O(n)", supports_dropout=True,
          hparams={"window": Int(256, min=0), "num_global": Int(1, min=0)},
          doc="Longformer: sliding window abs(i - j) <= window + num_global global tokens "
              "(Beltagy et al. 2020)")
def longformer_attention(q, k, v, *, kv_mask=None, causal=False, window, num_global,
                         dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
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
    out = unblock(merge(part))  # [B, H, N, Dv]
    gq = min(num_global, q.shape[1])
    if gq > 0:
        # Global queries see every key: dense rows, O(num_global * n).
        mask = pair_mask(keep, np.arange(gq)[None], np.arange(k.shape[1]), kvm, causal)
        rows = partial_attention(qh[:, :, None, :gq], [(kh, vh, mask)],
                                 dropout_rate=dropout_rate, dropout_rng=keys[1])
        out = out.at[:, :, :gq].set(merge(rows)[:, :, 0])
    return finish(out, q.shape[1], v.dtype)
