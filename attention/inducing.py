"""Inducing-point attention, after the Set Transformer's ISAB (Lee et al., 2019, eq. 9):
m learned inducing points I (params) attend to the sequence, H = softmax(I k^T / sqrt(d)),
then the sequence attends to them: softmax(q (H k)^T / sqrt(d)) (H v).

No projections live here (the model layer owns them), so the m summaries carry a pooled key
H k and a pooled value H v. Padded keys are masked in the first softmax. Not causal: every
summary mixes the whole sequence. Cost: n m.
Deviation (docs/faithfulness.md): the attention part of ISAB only. The Set Transformer's
ISAB is two full MAB blocks (projections, residual, LayerNorm and a feed-forward on H between
the two attentions); here H is the pooled keys/values, with the model layer's projections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Int, register
from attention._util import check_causal, check_qkv, masked_softmax, scale

NAME = "inducing"


def init_state(key, *, q_len, kv_len, num_heads, head_dim, num_inducing):
    """params: inducing [H, num_inducing, D], standard normal."""
    del q_len, kv_len
    return {"params": {"inducing": jax.random.normal(key, (num_heads, num_inducing, head_dim))},
            "buffers": {}}


@register(NAME, supports_causal=False, complexity="O(n)", init_state=init_state,
          hparams={"num_inducing": Int(32, min=1)},
          doc="Lee et al. 2019 (Set Transformer ISAB): m learned inducing points in between")
def inducing_attention(q, k, v, *, kv_mask=None, causal=False, num_inducing, inducing=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; inducing [H, m, D] -> [B, Tq, H, Dv]."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, False, q.shape[1], k.shape[1])
    b, tq, h, d = q.shape
    if inducing is None or tuple(inducing.shape) != (h, num_inducing, d):
        raise ValueError(f"{NAME}: inducing [heads, num_inducing, head_dim] = "
                         f"{(h, num_inducing, d)} required (from init_state); got "
                         f"{None if inducing is None else tuple(inducing.shape)}")
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    k32, v32 = f32(k), f32(v)
    if kv_mask is not None:
        k32 = jnp.where(kv_mask[:, :, None, None], k32, 0.0)
        v32 = jnp.where(kv_mask[:, :, None, None], v32, 0.0)
    kmask = jnp.ones((1, 1, 1, 1), bool) if kv_mask is None else kv_mask[:, None, None, :]
    pool = masked_softmax(jnp.einsum("hmd,bkhd->bhmk", f32(inducing), k32) * scale(d),
                          kmask)                                   # [B, H, m, Tk]
    hk = jnp.einsum("bhmk,bkhd->bhmd", pool, k32)                  # pooled keys
    hv = jnp.einsum("bhmk,bkhd->bhmd", pool, v32)                  # pooled values
    has_key = jnp.ones((b, 1, 1, 1), bool) if kv_mask is None else \
        jnp.any(kv_mask, axis=1)[:, None, None, None]
    weights = masked_softmax(jnp.einsum("bqhd,bhmd->bhqm", f32(q), hk) * scale(d), has_key)
    return jnp.einsum("bhqm,bhmd->bqhd", weights, hv).astype(v.dtype)
