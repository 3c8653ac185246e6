"""Nystromformer (Xiong et al., 2021, eq. 14-16): softmax attention approximated through m
landmarks (segment means of queries and keys): softmax(q kl^T) pinv(softmax(ql kl^T))
softmax(ql k^T) v, the pseudo-inverse by the iterative Moore-Penrose method (eq. 16,
Razavi et al. 2014).

Segments split the real tokens (kv_mask; queries share it when q_len == kv_len) into m runs of
equal count, so landmarks do not depend on padding; with fewer real tokens than m the empty
landmarks are dropped (identity rows of the landmark kernel, zero columns elsewhere). The
initial scale of the iteration is taken per example and head (the paper's code takes it over
the whole batch, which couples examples). Not causal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Int, register
from attention._util import check_causal, check_qkv, masked_softmax, scale

NAME = "nystrom"


def _landmarks(x, real, m):
    """x [B, T, H, D], real bool [B, T] -> (segment means [B, H, m, D], valid bool [B, m])."""
    n_real = jnp.sum(real, axis=1, keepdims=True)                  # [B, 1]
    rank = jnp.cumsum(real, axis=1) - 1                            # rank among real tokens
    seg = (rank * m) // jnp.maximum(n_real, 1)                     # [B, T] in [0, m)
    onehot = jax.nn.one_hot(seg, m) * real[..., None]              # [B, T, m]
    count = jnp.sum(onehot, axis=1)                                # [B, m]
    sums = jnp.einsum("btm,bthd->bhmd", onehot, x)
    return sums / jnp.maximum(count, 1.0)[:, None, :, None], count > 0


def pinv(a, iters: int):
    """Iterative Moore-Penrose pseudo-inverse of a [..., m, m] (eq. 16)."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    norm = (jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)
            * jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1))
    z = jnp.swapaxes(a, -1, -2) / norm[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register(NAME, supports_causal=False, complexity="O(n)",
          hparams={"num_landmarks": Int(64, min=1), "pinv_iters": Int(6, min=1)},
          doc="Xiong et al. 2021 (Nystromformer): segment-mean landmarks, iterative pinv")
def nystrom_attention(q, k, v, *, kv_mask=None, causal=False, num_landmarks, pinv_iters):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D] -> [B, Tq, H, Dv]."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, False, q.shape[1], k.shape[1])
    b, tq, h, d = q.shape
    tk = k.shape[1]
    m = num_landmarks
    s = scale(d)
    key_real = jnp.ones((b, tk), bool) if kv_mask is None else kv_mask
    query_real = key_real if tq == tk else jnp.ones((b, tq), bool)
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    v32 = jnp.where(key_real[:, :, None, None], v.astype(jnp.float32), 0.0)
    ql, q_ok = _landmarks(q32, query_real, m)                      # [B, H, m, D], [B, m]
    kl, k_ok = _landmarks(k32, key_real, m)
    k_ok_cols = k_ok[:, None, None, :]                             # [B, 1, 1, m]
    f = masked_softmax(jnp.einsum("bqhd,bhmd->bhqm", q32, kl) * s, k_ok_cols)  # [B,H,Tq,m]
    a = masked_softmax(jnp.einsum("bhmd,bhnd->bhmn", ql, kl) * s, k_ok_cols)   # [B,H,m,m]
    # Drop empty landmarks: identity rows and columns keep pinv block-diagonal.
    ok2 = q_ok[:, None, :, None] & k_ok_cols
    a = jnp.where(ok2, a, jnp.eye(m))
    bmat = masked_softmax(jnp.einsum("bhmd,bkhd->bhmk", ql, k32) * s,
                          key_real[:, None, None, :])              # [B, H, m, Tk]
    bmat = jnp.where(q_ok[:, None, :, None], bmat, 0.0)
    z = pinv(a, pinv_iters)
    out = jnp.einsum("bhqm,bhmn,bhnd->bqhd", f, z, jnp.einsum("bhmk,bkhd->bhmd", bmat, v32))
    return out.astype(v.dtype)
