"""Routing Transformer attention (Roy et al., 2021, sec. 4): queries and keys are routed to
k-means centroids (spherical k-means on unit-normalised vectors, centroids updated by an
exponential moving average during training, eq. 8-9); attention within each cluster.

Non-causal: balanced clusters: each centroid takes its top w = ceil(n / num_clusters) queries
and top w keys by cosine similarity (n = real tokens, so padding changes nothing); a query
taken by several clusters merges them by log-sum-exp weights, a query taken by none gets zeros.
Causal: top-w selection would let later tokens displace earlier ones, so each token goes to
its nearest centroid and a query sees the last w keys of its cluster up to its position
(sorted-order window, see _buckets).
Local heads: as in the paper (and its reference code), a share of the heads are local-attention
heads (sliding window abs(i - j) <= local_window, attention/local.py): the first
ceil(local_head_fraction * heads) heads. A query no cluster picks gets zeros in a routing head
(as in the reference), but every real query attends in the local heads, so none is left without
attention (local_head_fraction=0 gives the all-routing variant). Centroids are kept for every
head; the local heads' rows are unused and never updated.
Cost with a fixed num_clusters: n^2 / num_clusters (the paper's O(n^1.5) takes
num_clusters ~ sqrt(n): num_clusters="sqrt" gives ceil(sqrt(n)) clusters, n the max length
given to init_state, so the count is fixed per model and padding still changes nothing).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attention import Float, Int, register
from attention._buckets import attend, sorted_chunk_attention
from attention._util import NEG_INF, check_causal, check_qkv, or_sqrt, scale
from attention.local import local_attention

NAME = "routing"
HPARAMS = {"num_clusters": Int(8, min=1, sqrt=True), "ema_decay": Float(0.999, lo=0.0, hi=1.0),
           "local_head_fraction": Float(0.5, lo=0.0, hi=1.0), "local_window": Int(32, min=0)}


def num_local_heads(num_heads: int, local_head_fraction: float) -> int:
    """ceil(local_head_fraction * num_heads): the first heads, local attention."""
    return min(num_heads, math.ceil(local_head_fraction * num_heads - 1e-9))


def _unit(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def init_state(key, *, q_len, kv_len, num_heads, head_dim, num_clusters, **unused):
    """buffers: centroids [H, num_clusters, D], random unit vectors ("sqrt": ceil(sqrt(max
    length)) of them; the centroids' count is then the cluster count)."""
    del unused
    kc = or_sqrt(num_clusters, max(q_len, kv_len))
    c = _unit(jax.random.normal(key, (num_heads, kc, head_dim)))
    return {"params": {}, "buffers": {"centroids": c}}


def update_buffers(buffers, q, k, *, kv_mask=None, ema_decay, local_head_fraction, **unused):
    """One mini-batch k-means step: each centroid moves toward the mean of the real unit
    queries and keys nearest to it, mu <- decay * mu + (1 - decay) * mean, then renormalised.
    A centroid with no assigned vector, and every centroid of a local head, stays where it is."""
    del unused
    num_clusters = buffers["centroids"].shape[1]
    mu = buffers["centroids"].astype(jnp.float32)                 # [H, K, D]
    x = jnp.concatenate([_unit(q), _unit(k)], axis=1)             # [B, Tq + Tk, H, D]
    if kv_mask is None:
        real = jnp.ones(x.shape[:2], bool)
    else:
        q_real = kv_mask if q.shape[1] == k.shape[1] else jnp.ones(q.shape[:2], bool)
        real = jnp.concatenate([q_real, kv_mask], axis=1)
    assign = jnp.argmax(jnp.einsum("bthd,hkd->bthk", x, mu), axis=-1)   # [B, T, H]
    onehot = jax.nn.one_hot(assign, num_clusters) * real[:, :, None, None]  # [B, T, H, K]
    sums = jnp.einsum("bthk,bthd->hkd", onehot, x)
    counts = jnp.sum(onehot, axis=(0, 1))[..., None]               # [H, K, 1]
    mean = sums / jnp.maximum(counts, 1.0)
    new = jnp.where(counts > 0, ema_decay * mu + (1.0 - ema_decay) * mean, mu)
    routed = jnp.arange(mu.shape[0]) >= num_local_heads(mu.shape[0], local_head_fraction)
    new = jnp.where(routed[:, None, None], _unit(new), mu).astype(buffers["centroids"].dtype)
    return {**buffers, "centroids": new}


@register(NAME, supports_causal=True, complexity="O(n^2/s)", init_state=init_state,
          update_buffers=update_buffers,
          hparams=HPARAMS,
          doc="Roy et al. 2021 (Routing Transformer): k-means routed, balanced clusters")
def routing_attention(q, k, v, *, kv_mask=None, causal=False, num_clusters, ema_decay,
                      local_head_fraction, local_window, centroids=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; centroids [H, K, D] -> [B, Tq, H, Dv]."""
    del ema_decay  # update_buffers's
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    h, d = q.shape[2], q.shape[3]
    if (centroids is None or centroids.ndim != 3 or centroids.shape[0] != h
            or centroids.shape[2] != d
            or (num_clusters != "sqrt" and centroids.shape[1] != num_clusters)):
        raise ValueError(f"{NAME}: centroids [heads, num_clusters, head_dim] = "
                         f"{(h, num_clusters, d)} required (from init_state); got "
                         f"{None if centroids is None else tuple(centroids.shape)}")
    nl = num_local_heads(h, local_head_fraction)
    parts = []
    if nl:
        parts.append(local_attention(q[:, :, :nl], k[:, :, :nl], v[:, :, :nl], kv_mask=kv_mask,
                                     causal=causal, window=local_window).astype(jnp.float32))
    if nl < h:
        parts.append(_routed(q[:, :, nl:], k[:, :, nl:], v[:, :, nl:], kv_mask, causal,
                             centroids[nl:]))
    return jnp.concatenate(parts, axis=2).astype(v.dtype)


def _routed(q, k, v, kv_mask, causal, centroids):
    """Routing heads: q [B, Tq, H', D]; k, v [B, Tk, H', D]; centroids [H', K, D] -> float32
    [B, Tq, H', Dv]."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    num_clusters = centroids.shape[1]
    mu = _unit(jax.lax.stop_gradient(centroids))
    key_real = jnp.ones((b, tk), bool) if kv_mask is None else kv_mask
    query_real = key_real if tq == tk else jnp.ones((b, tq), bool)
    q32, k32, v32 = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in (q, k, v))  # [B,H,T,D]
    n_q = jnp.sum(query_real, axis=1).astype(jnp.int32)           # [B]
    n_k = jnp.sum(key_real, axis=1).astype(jnp.int32)
    kc = num_clusters

    if causal:
        # Nearest centroid per token; queries and keys sorted together by (cluster, position).
        bq = jnp.argmax(jnp.einsum("bhtd,hkd->bhtk", _unit(q32), mu), -1)
        bk = jnp.argmax(jnp.einsum("bhtd,hkd->bhtk", _unit(k32), mu), -1)
        bq = jnp.where(query_real[:, None], bq, kc)
        bk = jnp.where(key_real[:, None], bk, kc)
        width = 2 * (-(-tq // kc))                                 # static items per chunk
        window = 2 * ((n_q + kc - 1) // kc)                        # real cluster size, [B]
        out, lse = sorted_chunk_attention(
            jnp.concatenate([q32, jnp.zeros_like(k32)], 2),
            jnp.concatenate([jnp.zeros_like(q32), k32], 2),
            jnp.concatenate([jnp.zeros_like(v32), v32], 2),
            bucket=jnp.concatenate([bq, bk], -1)[:, :, None].astype(jnp.int32),
            pos=jnp.concatenate([jnp.arange(tq), jnp.arange(tk)]),
            kind=jnp.concatenate([jnp.ones(tq, jnp.int32), jnp.zeros(tk, jnp.int32)]),
            is_key=jnp.concatenate([jnp.zeros(tq, bool), jnp.ones(tk, bool)]),
            key_real=jnp.concatenate([jnp.zeros((b, tq), bool), key_real], 1),
            num_buckets=kc, chunk_size=width, causal=True, window=window,
            exclude_self=False, scale=scale(d))
        out = out[:, :, 0, :tq]                                    # [B, H, Tq, Dv]
        return jnp.swapaxes(out, 1, 2)

    # Balanced clusters: top-w queries and top-w keys per centroid (padding scores last).
    wq, wk = -(-tq // kc), -(-tk // kc)
    sq = jnp.einsum("bhtd,hkd->bhkt", _unit(q32), mu)
    sk = jnp.einsum("bhtd,hkd->bhkt", _unit(k32), mu)
    sq = jnp.where(query_real[:, None, None], sq, NEG_INF)
    sk = jnp.where(key_real[:, None, None], sk, NEG_INF)
    _, iq = jax.lax.top_k(sq, wq)                                  # [B, H, K, wq]
    _, ik = jax.lax.top_k(sk, wk)                                  # [B, H, K, wk]
    # Only the first ceil(n_real / K) members count, so the cluster size does not depend on
    # how many padding tokens there are.
    valid_q = jnp.arange(wq) < ((n_q + kc - 1) // kc)[:, None, None, None]   # [B, 1, 1, wq]
    valid_k = jnp.arange(wk) < ((n_k + kc - 1) // kc)[:, None, None, None]

    def take(x, idx):  # x [B, H, T, F], idx [B, H, K, w] -> [B, H, K, w, F]
        return jnp.take_along_axis(x[:, :, None], idx[..., None], axis=3)

    logits = jnp.einsum("bhkqd,bhkjd->bhkqj", take(q32, iq), take(k32, ik)) * scale(d)
    o, lse = attend(logits, jnp.broadcast_to(valid_k[..., None, :], logits.shape),
                    take(v32, ik))                                 # [B,H,K,wq,Dv], [B,H,K,wq]
    lse = jnp.where(valid_q, lse, NEG_INF)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(h)[None, :, None, None]
    m = jnp.full((b, h, tq), NEG_INF).at[bi, hi, iq].max(lse)      # per query, over clusters
    m = jax.lax.stop_gradient(m)
    w = jnp.where(lse > NEG_INF / 2, jnp.exp(lse - m[bi, hi, iq]), 0.0)
    num = jnp.zeros((b, h, tq, v.shape[-1])).at[bi, hi, iq].add(w[..., None] * o)
    den = jnp.zeros((b, h, tq)).at[bi, hi, iq].add(w)
    out = num / jnp.where(den == 0, 1.0, den)[..., None]
    return jnp.swapaxes(out, 1, 2)
