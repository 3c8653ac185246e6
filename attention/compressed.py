"""Memory-compressed attention (Liu et al., 2018, sec. 4.2.2): keys and values are shortened by
a strided convolution (kernel = stride = `compression`, learned per head: params), then
attended densely: softmax(q (conv k)^T / sqrt(d)) (conv v).

Padded keys and values are zeroed before the convolution and a compressed slot whose window
holds no real key is masked, so padding changes nothing. Causal: a query sees the compressed
slots of the windows that ended at or before it, plus the raw keys of its own (unfinished)
window up to itself, in one softmax (a compressed slot mixes the whole window, so the current
window cannot be used compressed). Cost: n^2 / compression; compression="sqrt": ceil(sqrt(n)),
n the max length given to init_state (the convolution's width then fixes it): O(n sqrt n).
Deviation (docs/faithfulness.md): the convolution is per head ([H, c, D, D], each head's D
channels); the paper's convolution mixes the whole model width before the split into heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Int, register
from attention._buckets import attend
from attention._util import check_causal, check_qkv, masked_softmax, or_sqrt, scale

NAME = "compressed"


def init_state(key, *, q_len, kv_len, num_heads, head_dim, compression):
    """params: conv_k, conv_v [H, compression, D, D] (lecun normal)."""
    compression = or_sqrt(compression, max(q_len, kv_len))
    kk, kv = jax.random.split(key)
    shape = (num_heads, compression, head_dim, head_dim)
    std = 1.0 / jnp.sqrt(compression * head_dim)
    return {"params": {"conv_k": jax.random.normal(kk, shape) * std,
                       "conv_v": jax.random.normal(kv, shape) * std},
            "buffers": {}}


@register(NAME, supports_causal=True, complexity="O(n^2/s)", init_state=init_state,
          hparams={"compression": Int(4, min=1, sqrt=True)},
          doc="Liu et al. 2018: keys/values compressed by a learned strided convolution")
def compressed_attention(q, k, v, *, kv_mask=None, causal=False, compression, conv_k=None,
                         conv_v=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; conv_k, conv_v [H, c, D, D] -> [B, Tq, H, Dv]."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    b, tq, h, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    if compression == "sqrt" and conv_k is not None and conv_k.ndim == 4:
        compression = conv_k.shape[1]         # fixed by init_state's max length
    c = compression
    for field, p, last in (("conv_k", conv_k, d), ("conv_v", conv_v, dv)):
        if p is None or tuple(p.shape) != (h, c, last, last):
            raise ValueError(f"{NAME}: {field} must be [heads, compression, D, D] = "
                             f"{(h, c, last, last)} (from init_state); got "
                             f"{None if p is None else tuple(p.shape)}")
    n = -(-tk // c)                                                # compressed length
    pad = n * c - tk
    mask = jnp.ones((b, tk), bool) if kv_mask is None else kv_mask
    mask = jnp.pad(mask, ((0, 0), (0, pad)))                       # [B, n c]

    def zeroed(x):  # [B, Tk, H, F] -> [B, n c, H, F], padding zeroed, float32
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.where(mask[:, :, None, None], x, 0.0)

    kz, vz = zeroed(k), zeroed(v)
    kc = jnp.einsum("bnchd,hcde->bhne", kz.reshape(b, n, c, h, d), conv_k.astype(jnp.float32))
    vc = jnp.einsum("bnchd,hcde->bhne", vz.reshape(b, n, c, h, dv), conv_v.astype(jnp.float32))
    slot_real = jnp.any(mask.reshape(b, n, c), axis=-1)            # [B, n]
    q32 = jnp.swapaxes(q.astype(jnp.float32), 1, 2)                # [B, H, Tq, D]
    if not causal:
        logits = jnp.einsum("bhqd,bhnd->bhqn", q32, kc) * scale(d)
        out, _ = attend(logits, jnp.broadcast_to(slot_real[:, None, None, :], logits.shape), vc)
        return jnp.swapaxes(out, 1, 2).astype(v.dtype)

    # Causal: queries in windows of c; window w sees slots < w compressed and its own raw keys.
    qw = jnp.pad(q32, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, n, c, d)
    kw = jnp.swapaxes(kz, 1, 2).reshape(b, h, n, c, d)
    vw = jnp.swapaxes(vz, 1, 2).reshape(b, h, n, c, dv)
    slot_logits = jnp.einsum("bhwqd,bhnd->bhwqn", qw, kc) * scale(d)   # [B, H, n, c, n]
    own_logits = jnp.einsum("bhwqd,bhwkd->bhwqk", qw, kw) * scale(d)   # [B, H, n, c, c]
    slot_mask = (jnp.arange(n)[None, :] < jnp.arange(n)[:, None])[None, None, :, None, :] \
        & slot_real[:, None, None, None, :]
    own_mask = jnp.tril(jnp.ones((c, c), bool)) & mask.reshape(b, 1, n, 1, c)
    logits = jnp.concatenate([slot_logits, own_logits], axis=-1)
    full_mask = jnp.concatenate([jnp.broadcast_to(slot_mask, slot_logits.shape),
                                 jnp.broadcast_to(own_mask, own_logits.shape)], axis=-1)
    weights = masked_softmax(logits, full_mask)                    # [B, H, n, c, n + c]
    out = (jnp.einsum("bhwqn,bhnd->bhwqd", weights[..., :n], vc)
           + jnp.einsum("bhwqk,bhwkd->bhwqd", weights[..., n:], vw))   # [B, H, n, c, Dv]
    out = out.reshape(b, h, n * c, dv)[:, :, :tq]
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)
