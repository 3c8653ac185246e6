"""Synthesizer attention (Tay et al., 2021, sec. 3): attention weights synthesised without
query-key dot products; quadratic by design.

synthesizer_dense (eq. 1-2): logits for query i are a 2-layer MLP of its own vector,
  B_i = relu(q_i W1 + b1) W2 + b2, one logit per key position.
synthesizer_random (sec. 3.2): a per-head logit matrix R [q_len, kv_len], learned
  (trainable=True) or fixed at its random init; factorized_rank r > 0 gives R = R1 R2^T.
Length-sized params are built for the max length given to init_state and sliced to the actual
lengths. kv_mask and causal are applied as masks on the synthesised logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Flag, Int, register
from attention._util import check_causal, check_qkv, masked_softmax


def _mask(b, tq, tk, kv_mask, causal):
    mask = jnp.ones((1, 1, tq, tk), bool)
    if causal:
        mask = mask & jnp.tril(jnp.ones((tq, tk), bool))
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :]
    return mask


def _length(name, field, p, axis, needed):
    if p.shape[axis] < needed:
        raise ValueError(f"{name}: {field} was built for length {p.shape[axis]} (the max length "
                         f"given to init_state) but the input needs {needed}; rebuild it")


# ---------------------------------------------------------------------------------------------
DENSE = "synthesizer_dense"


def init_dense(key, *, q_len, kv_len, num_heads, head_dim, hidden_dim):
    """params: w1 [H, D, hidden], b1 [H, hidden], w2 [H, hidden, kv_len], b2 [H, kv_len]."""
    del q_len
    k1, k2 = jax.random.split(key)
    return {
        "params": {
            "w1": jax.random.normal(k1, (num_heads, head_dim, hidden_dim)) / jnp.sqrt(head_dim),
            "b1": jnp.zeros((num_heads, hidden_dim)),
            "w2": jax.random.normal(k2, (num_heads, hidden_dim, kv_len)) / jnp.sqrt(hidden_dim),
            "b2": jnp.zeros((num_heads, kv_len)),
        },
        "buffers": {},
    }


@register(DENSE, supports_causal=True, complexity="O(n^2)", init_state=init_dense,
          hparams={"hidden_dim": Int(64, min=1)},
          doc="Tay et al. 2021 (Synthesizer, dense): logits from an MLP of each query token")
def synthesizer_dense(q, k, v, *, kv_mask=None, causal=False, hidden_dim, w1=None, b1=None,
                      w2=None, b2=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D] (k unused) -> [B, Tq, H, Dv]."""
    check_qkv(DENSE, q, k, v, kv_mask)
    check_causal(DENSE, causal, True, q.shape[1], k.shape[1])
    b, tq, h, d = q.shape
    tk = k.shape[1]
    if w1 is None or b1 is None or w2 is None or b2 is None:
        raise ValueError(f"{DENSE}: params w1, b1, w2, b2 (from init_state) are required")
    if tuple(w1.shape) != (h, d, hidden_dim) or w2.shape[:2] != (h, hidden_dim):
        raise ValueError(f"{DENSE}: w1 {tuple(w1.shape)} / w2 {tuple(w2.shape)} do not match "
                         f"heads={h}, head_dim={d}, hidden_dim={hidden_dim}")
    _length(DENSE, "w2", w2, 2, tk)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    hidden = jax.nn.relu(jnp.einsum("bqhd,hde->bhqe", f32(q), f32(w1)) + f32(b1)[None, :, None])
    logits = (jnp.einsum("bhqe,hek->bhqk", hidden, f32(w2[:, :, :tk]))
              + f32(b2[:, :tk])[None, :, None])                    # [B, H, Tq, Tk]
    weights = masked_softmax(logits, _mask(b, tq, tk, kv_mask, causal))
    return jnp.einsum("bhqk,bkhd->bqhd", weights, f32(v)).astype(v.dtype)


# ---------------------------------------------------------------------------------------------
RANDOM = "synthesizer_random"


def init_random(key, *, q_len, kv_len, num_heads, head_dim, trainable, factorized_rank):
    """logits [H, q_len, kv_len], or factor_q [H, q_len, r] and factor_k [H, kv_len, r];
    params when trainable, buffers otherwise."""
    del head_dim
    r = factorized_rank
    if r == 0:
        arrays = {"logits": jax.random.normal(key, (num_heads, q_len, kv_len))}
    else:
        kq, kk = jax.random.split(key)
        arrays = {"factor_q": jax.random.normal(kq, (num_heads, q_len, r)) / r ** 0.25,
                  "factor_k": jax.random.normal(kk, (num_heads, kv_len, r)) / r ** 0.25}
    return {"params": arrays, "buffers": {}} if trainable else {"params": {}, "buffers": arrays}


@register(RANDOM, supports_causal=True, complexity="O(n^2)", init_state=init_random,
          hparams={"trainable": Flag(True), "factorized_rank": Int(0, min=0)},
          doc="Tay et al. 2021 (Synthesizer, random): learned or fixed per-head logit matrix")
def synthesizer_random(q, k, v, *, kv_mask=None, causal=False, trainable, factorized_rank,
                       logits=None, factor_q=None, factor_k=None):
    """q: [B, Tq, H, D] (shape only); k, v: [B, Tk, H, D] -> [B, Tq, H, Dv]."""
    check_qkv(RANDOM, q, k, v, kv_mask)
    check_causal(RANDOM, causal, True, q.shape[1], k.shape[1])
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    if factorized_rank == 0:
        if logits is None or logits.ndim != 3 or logits.shape[0] != h:
            raise ValueError(f"{RANDOM}: logits [heads, q_len, kv_len] (from init_state) "
                             f"required with factorized_rank=0")
        _length(RANDOM, "logits", logits, 1, tq)
        _length(RANDOM, "logits", logits, 2, tk)
        r = logits[:, :tq, :tk].astype(jnp.float32)
    else:
        for field, p in (("factor_q", factor_q), ("factor_k", factor_k)):
            if p is None or p.ndim != 3 or p.shape[0] != h or p.shape[2] != factorized_rank:
                raise ValueError(f"{RANDOM}: {field} [heads, length, factorized_rank] (from "
                                 f"init_state) required with factorized_rank="
                                 f"{factorized_rank}")
        _length(RANDOM, "factor_q", factor_q, 1, tq)
        _length(RANDOM, "factor_k", factor_k, 1, tk)
        r = jnp.einsum("hqr,hkr->hqk", factor_q[:, :tq].astype(jnp.float32),
                       factor_k[:, :tk].astype(jnp.float32))
    if not trainable:
        r = jax.lax.stop_gradient(r)
    weights = masked_softmax(r[None], _mask(b, tq, tk, kv_mask, causal))   # [B, H, Tq, Tk]
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32)).astype(v.dtype)
