"""Helpers shared by the variant modules: shape checks and masked softmax."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Large negative logit for masked pairs. Finite, so a fully masked row gives no NaN; rows with
# no visible key are zeroed explicitly by the callers.
NEG_INF = -1e30


def check_qkv(name: str, q, k, v, kv_mask=None):
    """Validates shapes of the contract; ValueError naming the variant otherwise."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{name}: q, k, v must be [batch, length, heads, head_dim]; got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{name}: batch/heads/length of q {q.shape}, k {k.shape}, v {v.shape} do not agree"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: q and k head_dim differ: {q.shape[3]} vs {k.shape[3]}")
    if kv_mask is not None and tuple(kv_mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"{name}: kv_mask must be [batch, kv_len] = {(k.shape[0], k.shape[1])}; "
            f"got {tuple(kv_mask.shape)}"
        )


def check_causal(name: str, causal: bool, supports: bool, q_len: int, kv_len: int):
    if causal and not supports:
        raise ValueError(f"attention variant {name!r} cannot be causal (causal=True given)")
    if causal and q_len != kv_len:
        raise ValueError(f"{name}: causal attention needs q_len == kv_len; got {q_len}, {kv_len}")


def check_int(name: str, field: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {field} must be an integer >= {minimum}; got {value!r}")


def sqrt_size(length: int) -> int:
    """ceil(sqrt(length)) (at least 1): the size the O(n sqrt n) settings of the papers use."""
    return math.isqrt(max(length, 1) - 1) + 1


def or_sqrt(value, length: int) -> int:
    """An `Int(..., sqrt=True)` hyperparameter at sequence length `length`: the integer, or
    sqrt_size(length) for "sqrt"."""
    return sqrt_size(length) if value == "sqrt" else value


def scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def masked_softmax(logits, mask, axis=-1):
    """Softmax over `axis` where mask is True; rows with no True give zeros (not NaN).

    Computed in float32 whatever the input dtype; returns float32.
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), NEG_INF)
    m = jnp.max(logits, axis=axis, keepdims=True)
    m = jax.lax.stop_gradient(m)
    e = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(denom == 0, 1.0, denom)


def dropout(x, rate: float, rng):
    """Inverted dropout on attention weights; identity when rate == 0 or rng is None."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
