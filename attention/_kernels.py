"""Kernelised (linear) attention given feature maps, shared by `linear` and `performer`:
out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j)
(Katharopoulos et al., 2020, eq. 4-6; Choromanski et al., 2021, eq. 4).

Padded keys get phi = 0, so they add nothing to either sum. Causal mode is a chunked scan:
running sums of phi(k) v^T over whole chunks (an exclusive prefix over chunks, one M x Dv state
per chunk, never one per position) plus the exact quadratic form inside each chunk.
Exponential key features may be given as logarithms (k_log=True); they are exponentiated
against a shared maximum (over real keys, per example and head; in causal mode a running
maximum carried by the scan), which cancels between numerator and denominator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention._util import NEG_INF


def _ratio(num, den):
    return num / jnp.where(den == 0, 1.0, den)[..., None]


def kernel_attention(qf, kf, v, kv_mask=None, *, causal: bool, chunk_size: int,
                     k_log: bool = False):
    """qf: [B, H, Tq, M] positive query features; kf: [B, H, Tk, M] positive key features (or
    their logs with k_log=True); v: [B, H, Tk, Dv]; kv_mask: bool [B, Tk]. Heads-first layout:
    every contraction below is a plain batched matmul, no transposes of [.., T, M] arrays.
    -> float32 [B, H, Tq, Dv]; zeros for a query with no visible key."""
    qf = qf.astype(jnp.float32)
    kf = kf.astype(jnp.float32)
    v = v.astype(jnp.float32)
    b, h, tk, m = kf.shape
    mask = jnp.ones((b, tk), bool) if kv_mask is None else kv_mask
    mask4 = mask[:, None, :, None]
    v = jnp.where(mask4, v, 0.0)
    if not causal:
        if k_log:  # padded logs -> NEG_INF before exp (no inf, no NaN gradient)
            kf = jnp.where(mask4, kf, NEG_INF)
            mx = jax.lax.stop_gradient(jnp.max(kf, axis=(2, 3), keepdims=True))
            kf = jnp.exp(kf - mx)
        kf = jnp.where(mask4, kf, 0.0)
        # A ones column on v gives the denominator sum_j phi(k_j) in the same matmuls.
        v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        kv = jnp.einsum("bhtm,bhtd->bhmd", kf, v1)                 # [B, H, M, Dv + 1]
        out = jnp.einsum("bhqm,bhmd->bhqd", qf, kv)
        return _ratio(out[..., :-1], out[..., -1])

    t = tk
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t

    def chunks(x):  # [B, H, T, F] -> [B, H, n, c, F]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
        return x.reshape(b, h, n, c, x.shape[-1])

    maskc = jnp.pad(mask, ((0, 0), (0, pad))).reshape(b, 1, n, c, 1)
    qc, kc, vc = chunks(qf), chunks(kf), chunks(v)
    if k_log:
        kc = jnp.where(maskc, kc, NEG_INF)
        mc = jax.lax.stop_gradient(jnp.max(kc, axis=(3, 4)))       # [B, H, n] chunk maxima
        kc = jnp.where(maskc, jnp.exp(kc - mc[..., None, None]), 0.0)
    else:
        kc = jnp.where(maskc, kc, 0.0)
    s = jnp.einsum("bhnck,bhncd->bhnkd", kc, vc)                   # [B, H, n, M, Dv]
    z = jnp.sum(kc, axis=3)                                        # [B, H, n, M]
    if k_log:
        def combine(x, y):
            m = jnp.maximum(x[0], y[0])
            ax, ay = jnp.exp(x[0] - m), jnp.exp(y[0] - m)
            return (m, x[1] * ax[..., None, None] + y[1] * ay[..., None, None],
                    x[2] * ax[..., None] + y[2] * ay[..., None])
        mp, sp, zp = jax.lax.associative_scan(combine, (mc, s, z), axis=2)
        # Exclusive prefix: shift by one chunk; the first sees nothing.
        mp = jnp.concatenate([jnp.full_like(mp[:, :, :1], NEG_INF), mp[:, :, :-1]], axis=2)
        sp = jnp.concatenate([jnp.zeros_like(sp[:, :, :1]), sp[:, :, :-1]], axis=2)
        zp = jnp.concatenate([jnp.zeros_like(zp[:, :, :1]), zp[:, :, :-1]], axis=2)
        top = jnp.maximum(mp, mc)
        a_prev, a_own = jnp.exp(mp - top), jnp.exp(mc - top)      # [B, H, n]
    else:
        sp = jnp.cumsum(s, axis=2) - s
        zp = jnp.cumsum(z, axis=2) - z
        a_prev = a_own = jnp.ones((b, h, n))
    scores = jnp.einsum("bhnqm,bhnkm->bhnqk", qc, kc) * jnp.tril(jnp.ones((c, c)))
    num = (a_prev[..., None, None] * jnp.einsum("bhnqm,bhnmd->bhnqd", qc, sp)
           + a_own[..., None, None] * jnp.einsum("bhnqk,bhnkd->bhnqd", scores, vc))
    den = (a_prev[..., None] * jnp.einsum("bhnqm,bhnm->bhnq", qc, zp)
           + a_own[..., None] * jnp.sum(scores, axis=-1))
    return _ratio(num, den).reshape(b, h, n * c, -1)[:, :, :t]
