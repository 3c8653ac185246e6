"""Reformer LSH attention (Kitaev et al., 2020, sec. 2): angular LSH h(x) = argmax([xR; -xR])
with a random rotation R per hash round, sort by bucket, attend within a chunk and the previous
chunk; hash rounds merged by their log-sum-exp weights (eq. 4-5, duplicates not discounted).

shared_qk=True (the Reformer): keys are the unit-normalised queries, k_j = q_j / ||q_j|| (the
`k` argument is ignored), and a token attends to itself only when nothing else is visible.
shared_qk=False: queries (hashed from q) and keys (hashed from k) are sorted together by
(bucket, position), so a chunk holds both; `chunk_size` then counts queries and keys.
Padding sorts last, so real tokens' chunks do not depend on it. Causal mode: see _buckets.
redraw: "fixed" (rotations drawn once) or "step" (fresh rotations every redraw_interval
training passes, from fold_in(key, draw number): the Reformer draws new ones each forward
pass; attention/_redraw.py). Evaluation uses the latest draw.
Deviation (docs/faithfulness.md): the first chunk does not look back to the last one (the
Reformer wraps around); wrapping to the last chunk would make the first chunk depend on the
amount of padding, which sorts last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Choice, Flag, Int, _redraw, register
from attention._buckets import merge, sorted_chunk_attention
from attention._util import check_causal, check_qkv, scale

NAME = "lsh"
HPARAMS = {"num_hashes": Int(2, min=1), "num_buckets": Int(32, min=1),
           "chunk_size": Int(64, min=1), "shared_qk": Flag(True),
           "redraw": Choice("fixed", options=_redraw.POLICIES), "redraw_interval": Int(1, min=1)}


def _buckets_in_pairs(hp):
    if hp["num_buckets"] > 1 and hp["num_buckets"] % 2:
        return f"num_buckets must be 1 or even (buckets come in pairs xR, -xR); got " \
               f"{hp['num_buckets']}"
    return None


def init_state(key, *, q_len, kv_len, num_heads, head_dim, num_hashes, num_buckets, redraw,
               **unused):
    """buffers: rotations [num_hashes, H, D, max(num_buckets // 2, 1)], random normal; with
    redraw="step" also the redraw buffers (attention/_redraw.py)."""
    del q_len, kv_len, unused
    shape = (num_hashes, num_heads, head_dim, max(num_buckets // 2, 1))
    rot = jax.random.normal(key, shape)
    return {"params": {}, "buffers": {"rotations": rot, **_redraw.buffers(key, redraw)}}


def update_buffers(buffers, q, k, *, kv_mask=None, redraw, redraw_interval, **unused):
    """Training pass: with redraw="step", fresh rotations every redraw_interval passes."""
    del q, k, kv_mask, unused
    if redraw == "fixed":
        return buffers
    shape = buffers["rotations"].shape
    return _redraw.step(buffers, "rotations", redraw_interval,
                        lambda key: jax.random.normal(key, shape))


def _hash(x, rotations, num_buckets):
    """x [B, T, H, D] -> bucket int32 [B, H, R, T]."""
    if num_buckets == 1:
        return jnp.zeros((x.shape[0], x.shape[2], rotations.shape[0], x.shape[1]), jnp.int32)
    xr = jnp.einsum("bthd,rhdk->bhrtk", x, rotations)
    return jnp.argmax(jnp.concatenate([xr, -xr], axis=-1), axis=-1).astype(jnp.int32)


@register(NAME, supports_causal=True, complexity="O(n log n)", init_state=init_state,
          update_buffers=update_buffers, constraint=_buckets_in_pairs,
          hparams=HPARAMS,
          doc="Kitaev et al. 2020 (Reformer): LSH buckets, sorted chunks, merged hash rounds")
def lsh_attention(q, k, v, *, kv_mask=None, causal=False, num_hashes, num_buckets, chunk_size,
                  shared_qk, redraw, redraw_interval, rotations=None, redraw_key=None,
                  redraw_count=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; rotations [R, H, D, nb/2] -> [B, Tq, H, Dv].
    redraw, redraw_interval, redraw_key, redraw_count: the redraw policy (update_buffers's)."""
    del redraw, redraw_interval, redraw_key, redraw_count
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    if rotations is None:
        raise ValueError(f"{NAME}: rotations (from init_state) are required")
    b, tq, h, d = q.shape
    tk = k.shape[1]
    if tuple(rotations.shape[:3]) != (num_hashes, h, d):
        raise ValueError(f"{NAME}: rotations shape {tuple(rotations.shape)} does not match "
                         f"num_hashes={num_hashes}, heads={h}, head_dim={d}")
    if shared_qk and tq != tk:
        raise ValueError(f"{NAME}: shared_qk=True needs q_len == kv_len; got {tq}, {tk}")
    rotations = jax.lax.stop_gradient(rotations).astype(jnp.float32)
    key_real = jnp.ones((b, tk), bool) if kv_mask is None else kv_mask
    # Queries of padded tokens (self-attention) are padding too: they sort last.
    query_real = key_real if tq == tk else jnp.ones((b, tq), bool)
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    to_bh = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, H, F] -> [B, H, T, F]

    if shared_qk:
        keys = q32 * jax.lax.rsqrt(jnp.sum(q32 * q32, -1, keepdims=True) + 1e-12)
        bucket = _hash(q32, rotations, num_buckets)
        bucket = jnp.where(key_real[:, None, None, :], bucket, num_buckets)
        out, lse = sorted_chunk_attention(
            to_bh(q32), to_bh(keys), to_bh(v), bucket=bucket, pos=jnp.arange(tq),
            kind=jnp.zeros(tq, jnp.int32), is_key=jnp.ones(tq, bool), key_real=key_real,
            num_buckets=num_buckets, chunk_size=chunk_size, causal=causal,
            window=min(chunk_size, tq), exclude_self=True, scale=scale(d))
    else:
        zq, zk = jnp.zeros_like(q32), jnp.zeros_like(k32)
        bq = jnp.where(query_real[:, None, None, :], _hash(q32, rotations, num_buckets),
                       num_buckets)
        bk = jnp.where(key_real[:, None, None, :], _hash(k32, rotations, num_buckets),
                       num_buckets)
        out, lse = sorted_chunk_attention(
            to_bh(jnp.concatenate([q32, zk], 1)), to_bh(jnp.concatenate([zq, k32], 1)),
            to_bh(jnp.concatenate([jnp.zeros_like(v), v], 1)),
            bucket=jnp.concatenate([bq, bk], -1),
            pos=jnp.concatenate([jnp.arange(tq), jnp.arange(tk)]),
            kind=jnp.concatenate([jnp.ones(tq, jnp.int32), jnp.zeros(tk, jnp.int32)]),
            is_key=jnp.concatenate([jnp.zeros(tq, bool), jnp.ones(tk, bool)]),
            key_real=jnp.concatenate([jnp.zeros((b, tq), bool), key_real], 1),
            num_buckets=num_buckets, chunk_size=chunk_size, causal=causal,
            window=min(chunk_size, tq + tk), exclude_self=False, scale=scale(d))
        out, lse = out[:, :, :, :tq], lse[:, :, :, :tq]
    out = merge(out, lse, axis=2)                          # [B, H, Tq, Dv]
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)
