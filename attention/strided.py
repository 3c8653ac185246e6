"""Strided (atrous, dilated) attention, (i - j) mod stride == 0 (Child et al. 2019, the
strided part): a reshape puts each residue class mod stride in its own group, then dense
attention within groups, O(n^2 / stride).
"""

from __future__ import annotations

from attention import Int, patterns, register
from attention._banded import finish, prepare, strided_part
from attention._blocks import merge
from attention._util import check_qkv, or_sqrt


@register("strided", supports_causal=True, complexity="O(n^2/s)", supports_dropout=True,
          hparams={"stride": Int(64, min=1, sqrt=True)},
          doc="Strided (atrous) attention (i - j) mod stride == 0 by residue-class reshape "
              "(Child et al. 2019)")
def strided_attention(q, k, v, *, kv_mask=None, causal=False, stride, dropout_rate=0.0,
                      dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv].
    stride="sqrt": ceil(sqrt(n)), n = max(Tq, Tk) (the padded length)."""
    check_qkv("strided", q, k, v, kv_mask)
    stride = or_sqrt(stride, max(q.shape[1], k.shape[1]))
    qh, kh, vh, kvm = prepare("strided", q, k, v, kv_mask, causal)
    keep = lambda i, j: patterns.strided(i, j, stride=stride)  # noqa: E731
    part = strided_part(qh, kh, vh, kvm, stride=stride, keep=keep, causal=causal,
                        dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return finish(merge(part), q.shape[1], v.dtype)
