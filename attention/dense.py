"""Dense softmax attention (Vaswani et al., 2017): softmax(q k^T / sqrt(d)) v. The reference."""

from __future__ import annotations

import jax.numpy as jnp

from attention import register
from attention._util import check_causal, check_qkv, dropout, masked_softmax, scale


@register("dense", supports_causal=True, complexity="O(n^2)", supports_dropout=True,
          hparams={},
          doc="Vaswani et al. 2017: full softmax attention, the quadratic reference")
def dense_attention(q, k, v, *, kv_mask=None, causal=False, dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
    check_qkv("dense", q, k, v, kv_mask)
    check_causal("dense", causal, True, q.shape[1], k.shape[1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * scale(q.shape[-1])  # [B, H, Tq, Tk]
    mask = jnp.ones(logits.shape[-2:], bool)[None, None]
    if causal:
        mask = mask & jnp.tril(jnp.ones(logits.shape[-2:], bool))[None, None]
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :]
    weights = masked_softmax(logits, mask)
    weights = dropout(weights, dropout_rate, dropout_rng)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(v.dtype)
