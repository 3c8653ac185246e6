"""Linformer (Wang et al., 2020, eq. 7): keys and values are projected along the length axis by
learned E, F [proj_dim, n]: softmax(q (E k)^T / sqrt(d)) (F v).

E, F (params, one pair per head) are sized by the max length given to init_state and sliced to
the actual kv_len. Padded keys and values are zeroed before projecting, so they add nothing to
E k and F v (the original LRA code projected the padding too). Not causal: every projected row
mixes the whole sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Int, register
from attention._util import check_causal, check_qkv, masked_softmax, scale

NAME = "linformer"


def init_state(key, *, q_len, kv_len, num_heads, head_dim, proj_dim):
    """params: E, F [H, proj_dim, kv_len], normal with variance 1 / kv_len (fan-in)."""
    del q_len, head_dim
    ke, kf = jax.random.split(key)
    std = 1.0 / jnp.sqrt(kv_len)
    return {
        "params": {
            "E": jax.random.normal(ke, (num_heads, proj_dim, kv_len)) * std,
            "F": jax.random.normal(kf, (num_heads, proj_dim, kv_len)) * std,
        },
        "buffers": {},
    }


@register(NAME, supports_causal=False, complexity="O(n)", init_state=init_state,
          hparams={"proj_dim": Int(256, min=1)},
          doc="Wang et al. 2020 (Linformer): keys/values projected along length by learned E, F")
def linformer_attention(q, k, v, *, kv_mask=None, causal=False, proj_dim, E=None, F=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; E, F: [H, proj_dim, >= Tk] -> [B, Tq, H, Dv]."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, False, q.shape[1], k.shape[1])
    b, tq, h, d = q.shape
    tk = k.shape[1]
    for field, p in (("E", E), ("F", F)):
        if p is None or p.ndim != 3 or p.shape[0] != h or p.shape[1] != proj_dim:
            raise ValueError(f"{NAME}: {field} must be [heads, proj_dim, max_len] = "
                             f"[{h}, {proj_dim}, >= {tk}] (from init_state); got "
                             f"{None if p is None else tuple(p.shape)}")
        if p.shape[2] < tk:
            raise ValueError(f"{NAME}: kv_len {tk} exceeds the max length {p.shape[2]} that "
                             f"{field} was built for; rebuild it with a larger kv_len")
    e = E[:, :, :tk].astype(jnp.float32)                          # [H, k, Tk]
    f = F[:, :, :tk].astype(jnp.float32)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    if kv_mask is not None:
        k32 = jnp.where(kv_mask[:, :, None, None], k32, 0.0)
        v32 = jnp.where(kv_mask[:, :, None, None], v32, 0.0)
    kp = jnp.einsum("hpt,bthd->bhpd", e, k32)                     # [B, H, k, D]
    vp = jnp.einsum("hpt,bthd->bhpd", f, v32)
    logits = jnp.einsum("bqhd,bhpd->bhqp", q.astype(jnp.float32), kp) * scale(d)
    has_key = jnp.ones((b, 1, 1, 1), bool) if kv_mask is None else \
        jnp.any(kv_mask, axis=1)[:, None, None, None]
    weights = masked_softmax(logits, has_key)                      # [B, H, Tq, k]
    out = jnp.einsum("bhqp,bhpd->bqhd", weights, vp)
    return out.astype(v.dtype)
