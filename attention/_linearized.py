"""Kernelised (linear) attention given feature maps, shared by `linear` and `performer`:
out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j)
(Katharopoulos et al., 2020, eq. 4-6; Choromanski et al., 2021, eq. 4).

Padded keys get phi = 0, so they add nothing to either sum. Causal mode is a chunked scan:
running sums of phi(k) v^T over whole chunks (an exclusive prefix over chunks, one M x Dv state
per chunk, never one per position) plus the exact quadratic form inside each chunk.
Exponential key features may be given as logarithms (k_log=True); they are exponentiated
against the maximum over the real keys a query sees (per example and head; causal: the running
maximum up to the query's position, so no later key enters a query's arithmetic), plus an
optional small constant k_eps (Performer's numerical stabiliser), so that no denominator
underflows to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention._util import NEG_INF


def _ratio(num, den):
    return num / jnp.where(den == 0, 1.0, den)[..., None]


def kernel_attention(qf, kf, v, kv_mask=None, *, causal: bool, chunk_size: int,
                     k_log: bool = False, k_eps: float = 0.0):
    """qf: [B, H, Tq, M] positive query features; kf: [B, H, Tk, M] positive key features (or
    their logs with k_log=True); v: [B, H, Tk, Dv]; kv_mask: bool [B, Tk]. Heads-first layout:
    every contraction below is a plain batched matmul, no transposes of [.., T, M] arrays.
    k_eps (k_log only): key features are exp(log - ref_i) + k_eps, ref_i the max of the logs
    over the real keys query i sees (all of them; causal: those at positions <= i), so that a
    causal output is the non-causal one on the prefix, and no denominator underflows to 0.
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
            kf = jnp.exp(kf - mx) + k_eps
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
    qc, vc = chunks(qf), chunks(v)
    tril = jnp.tril(jnp.ones((c, c), bool))
    if k_log:
        # ref_i: running max of the real keys' logs up to position i (the padded tail carries
        # the last value), so key j enters query i's sums as exp(log_j - ref_j) exp(ref_j -
        # ref_i): both factors <= 1 and nothing after i is read. Chunk states are kept against
        # their chunk's last ref (end) and carried with weights exp(end_b - end_a) <= 1.
        lk = jnp.where(maskc, chunks(kf), NEG_INF)                 # [B, H, n, c, M]
        ref = jax.lax.stop_gradient(jax.lax.cummax(
            jnp.max(lk, axis=-1).reshape(b, h, n * c), axis=2).reshape(b, h, n, c))
        end = ref[..., -1]                                         # [B, H, n]
        kin = jnp.where(maskc, jnp.exp(lk - ref[..., None]), 0.0)  # against own ref
        kst = kin * jnp.exp(ref - end[..., None])[..., None]       # against the chunk's end
        s = jnp.einsum("bhnck,bhncd->bhnkd", kst, vc)              # [B, H, n, M, Dv]
        z = jnp.sum(kst, axis=3)                                   # [B, H, n, M]

        def combine(x, y):
            mx = jnp.maximum(x[0], y[0])
            ax, ay = jnp.exp(x[0] - mx), jnp.exp(y[0] - mx)
            return (mx, x[1] * ax[..., None, None] + y[1] * ay[..., None, None],
                    x[2] * ax[..., None] + y[2] * ay[..., None])
        mp, sp, zp = jax.lax.associative_scan(combine, (end, s, z), axis=2)
        # Exclusive prefix: shift by one chunk; the first sees nothing.
        mp = jnp.concatenate([jnp.full_like(mp[:, :, :1], NEG_INF), mp[:, :, :-1]], axis=2)
        sp = jnp.concatenate([jnp.zeros_like(sp[:, :, :1]), sp[:, :, :-1]], axis=2)
        zp = jnp.concatenate([jnp.zeros_like(zp[:, :, :1]), zp[:, :, :-1]], axis=2)
        a_prev = jnp.exp(mp[..., None] - ref)                      # [B, H, n, c] <= 1
        pair = jnp.where(tril, jnp.exp(jnp.minimum(ref[..., None, :] - ref[..., :, None], 0.0)),
                         0.0)                                      # [B, H, n, c(q), c(k)]
        kc = kin
    else:
        kc = jnp.where(maskc, chunks(kf), 0.0)
        s = jnp.einsum("bhnck,bhncd->bhnkd", kc, vc)
        z = jnp.sum(kc, axis=3)
        sp = jnp.cumsum(s, axis=2) - s
        zp = jnp.cumsum(z, axis=2) - z
        a_prev = jnp.ones((b, h, n, c))
        pair = tril.astype(jnp.float32)
    scores = jnp.einsum("bhnqm,bhnkm->bhnqk", qc, kc) * pair
    num = (a_prev[..., None] * jnp.einsum("bhnqm,bhnmd->bhnqd", qc, sp)
           + jnp.einsum("bhnqk,bhnkd->bhnqd", scores, vc))
    den = a_prev * jnp.einsum("bhnqm,bhnm->bhnq", qc, zp) + jnp.sum(scores, axis=-1)
    if k_log and k_eps:  # k_eps * phi(q_i) . 1 times the prefix sums of v and of the count
        qsum = k_eps * jnp.sum(qc, axis=-1)                        # [B, H, n, c]
        cv = jnp.cumsum(v, axis=2)
        cn = jnp.cumsum(mask, axis=1, dtype=jnp.float32)[:, None, :, None]
        num = num + qsum[..., None] * chunks(cv)
        den = den + qsum * chunks(jnp.broadcast_to(cn, (b, h, t, 1)))[..., 0]
    return _ratio(num, den).reshape(b, h, n * c, -1)[:, :, :t]
