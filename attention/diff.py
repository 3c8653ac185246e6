"""Differential attention (Ye et al. 2024, "Differential Transformer", eq. 1-3): each head's q
and k are split into halves (q1, q2), (k1, k2) of D/2 channels; two softmax maps
A_i = softmax(q_i k_i^T / sqrt(D/2)) share the full value,

    out = (A1 - lambda A2) V,   lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,

then per head an RMS normalisation over the head's output channels and the scale
(1 - lambda_init) (head_norm=True, eq. 3; the norm without its affine weight, which the output
projection absorbs; head_norm=False skips both). lq1, lk1, lq2, lk2 [D/2] are params from
init_state, N(0, 0.1^2), one set per layer shared by its heads as in the authors' code.

lambda_init: the paper sets 0.8 - 0.6 exp(-0.3 (l - 1)) from the layer index l, which the
contract does not give; here it is a declared constant, default 0.8 (the formula's value for
deep layers, and the constant the paper's ablation (Table 6) finds as good). Quadratic like
dense; causal and padding as dense (a query with no visible key gets zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Flag, Float, register
from attention._util import check_causal, check_qkv, masked_softmax, scale

NAME = "diff"
RMS_EPS = 1e-5


def diff_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init):
    """exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (float32 scalar)."""
    f = lambda a, b: jnp.exp(jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32)))  # noqa
    return f(lambda_q1, lambda_k1) - f(lambda_q2, lambda_k2) + lambda_init


def finish(out, lam, lambda_init, head_norm):
    """out [.., Dv] = A1 V - lambda A2 V -> normalised and scaled (head_norm), float32."""
    if not head_norm:
        return out
    out = out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + RMS_EPS)
    return out * (1.0 - lambda_init)


def split_halves(name, q, k):
    d = q.shape[-1]
    if d % 2:
        raise ValueError(f"{name}: head_dim must be even (q and k are split in halves); got {d}")
    return (q[..., : d // 2], q[..., d // 2:]), (k[..., : d // 2], k[..., d // 2:])


def init_state(key, *, q_len, kv_len, num_heads, head_dim, lambda_init, head_norm):
    del q_len, kv_len, num_heads, lambda_init, head_norm
    keys = jax.random.split(key, 4)
    names = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    return {"params": {n: 0.1 * jax.random.normal(kk, (head_dim // 2,))
                       for n, kk in zip(names, keys)}, "buffers": {}}


@register(NAME, supports_causal=True, complexity="O(n^2)", init_state=init_state,
          hparams={"lambda_init": Float(0.8, lo=0.0, hi=1.0), "head_norm": Flag(True)},
          doc="Ye et al. 2024 (Differential Transformer): (softmax1 - lambda softmax2) V on "
              "halves of q, k; learned lambda, per-head RMS norm")
def diff_attention(q, k, v, *, kv_mask=None, causal=False, lambda_init, head_norm,
                   lambda_q1=None, lambda_k1=None, lambda_q2=None, lambda_k2=None):
    """q, k: [B, T, H, D] (D even); v: [B, Tk, H, Dv]; kv_mask: bool [B, Tk] -> [B, Tq, H, Dv]."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    (q1, q2), (k1, k2) = split_halves(NAME, q, k)
    if lambda_q1 is None or lambda_q1.shape != (q.shape[-1] // 2,):
        raise ValueError(f"{NAME}: params lambda_q1, lambda_k1, lambda_q2, lambda_k2 "
                         f"[{q.shape[-1] // 2}] required (from init_state)")
    tq, tk = q.shape[1], k.shape[1]
    mask = jnp.ones((tq, tk), bool)[None, None]
    if causal:
        mask = mask & jnp.tril(jnp.ones((tq, tk), bool))[None, None]
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :]

    def softmax_map(qh, kh):
        logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, preferred_element_type=jnp.float32)
        return masked_softmax(logits * scale(qh.shape[-1]), mask)

    lam = diff_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init)
    weights = softmax_map(q1, k1) - lam * softmax_map(q2, k2)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32))
    return finish(out, lam, lambda_init, head_norm).astype(v.dtype)
