"""Helpers for content-based sparse attention (Reformer LSH, Routing Transformer).

`attend`: masked softmax attention that also returns the log-sum-exp of each query's logits, so
that several partial attentions of one query (hash rounds, clusters) can be merged exactly as
one softmax over the union of their keys (Kitaev et al. 2020, eq. 4-5 without duplicate
counting).

`sorted_chunk_attention`: items (queries and/or keys) are sorted by (bucket, position, kind)
and cut into chunks; each chunk attends to itself and to the previous chunk (Reformer, sec. 2.2).
Causal mode restricts a query to keys of its own bucket, earlier or equal in position, at most
`window` places before it in the sorted order. Those keys are the last `window` same-bucket
items up to the query's position, so nothing after the query can change what it sees (a plain
chunk boundary would move when a later token changes bucket).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention._util import NEG_INF


def merge(outs, lses, axis):
    """Merges partial softmax attentions along `axis`: outs [..., P, ..., Dv], lses [..., P, ...]
    (lse NEG_INF = saw nothing) -> one softmax over the union of their keys."""
    m = jax.lax.stop_gradient(jnp.max(lses, axis=axis, keepdims=True))
    w = jnp.where(lses > NEG_INF / 2, jnp.exp(lses - m), 0.0)
    den = jnp.sum(w, axis=axis)
    num = jnp.sum(w[..., None] * outs, axis=axis)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


def attend(logits, mask, v):
    """logits, mask: [..., Q, K]; v: [..., K, Dv] -> (out [..., Q, Dv], lse [..., Q]).

    Float32. A query with no visible key gets out = 0 and lse = NEG_INF.
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), NEG_INF)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(logits - m), 0.0)
    s = jnp.sum(e, axis=-1)
    safe = jnp.where(s == 0, 1.0, s)
    out = jnp.einsum("...qk,...kd->...qd", e, v.astype(jnp.float32)) / safe[..., None]
    lse = jnp.where(s == 0, NEG_INF, m[..., 0] + jnp.log(safe))
    return out, lse


def _chunks(x, n_chunks, axis):
    """Splits `axis` of length n_chunks * c into [n_chunks, c]."""
    shape = x.shape[:axis] + (n_chunks, x.shape[axis] // n_chunks) + x.shape[axis + 1:]
    return x.reshape(shape)


def _with_previous(x, axis):
    """x [..., n, c, ...] (chunk axis `axis`) -> [..., n, 2c, ...]: previous chunk, then own.
    The chunk before the first is filled with zeros (callers mask it)."""
    prev = jnp.roll(x, 1, axis=axis)
    return jnp.concatenate([prev, x], axis=axis + 1)


def sorted_chunk_attention(item_q, item_k, item_v, *, bucket, pos, kind, is_key, key_real,
                           num_buckets: int, chunk_size: int, causal: bool, window,
                           exclude_self: bool, scale: float):
    """Attention among items sorted by (bucket, position, kind), chunk by chunk.

    item_q, item_k: [B, H, N, D] query / key vector of each item (zeros where an item is not
    one); item_v: [B, H, N, Dv]. bucket: int [B, H, R, N], one row per hash round / routing,
    in [0, num_buckets]; num_buckets marks items that are neither real queries nor real keys
    (padding), which sort last so that real items never share a chunk position with them.
    pos: int [N] sequence position; kind: int [N] (0 = key item, 1 = query item, ties at one
    position put keys first); is_key: bool [N]; key_real: bool [B, N] (kv_mask on key items).
    window: int or int array [B] (causal mode only: sorted-order reach, at most chunk_size).
    exclude_self: shared-QK mode: an item does not attend to itself unless nothing else is
    visible to it.
    -> out [B, H, R, N, Dv], lse [B, H, R, N] (float32), both in the items' original order.
    """
    b, h, n, _ = item_q.shape
    r = bucket.shape[2]
    c = chunk_size
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    if pad:  # filler items, sorted after everything real
        item_q = jnp.pad(item_q, ((0, 0), (0, 0), (0, pad), (0, 0)))
        item_k = jnp.pad(item_k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        item_v = jnp.pad(item_v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        bucket = jnp.pad(bucket, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=num_buckets)
        pos = jnp.pad(pos, (0, pad), constant_values=jnp.iinfo(jnp.int32).max)
        kind = jnp.pad(kind, (0, pad))
        is_key = jnp.pad(is_key, (0, pad))
        key_real = jnp.pad(key_real, ((0, 0), (0, pad)))
    n_pad = n + pad
    full = (b, h, r, n_pad)
    iota = jnp.broadcast_to(jnp.arange(n_pad, dtype=jnp.int32), full)
    _, _, _, perm = jax.lax.sort(
        (bucket.astype(jnp.int32), jnp.broadcast_to(pos.astype(jnp.int32), full),
         jnp.broadcast_to(kind.astype(jnp.int32), full), iota), dimension=-1, num_keys=3)
    # perm [B, H, R, N']: sorted slot -> item.

    def gather(x):  # x [B, H, N', F] -> [B, H, R, n_chunks, c, F]
        y = jnp.take_along_axis(x[:, :, None], perm[..., None], axis=3)
        return _chunks(y, n_chunks, axis=3)

    def gather_flat(x):  # x broadcastable to [B, H, R, N'] -> [B, H, R, n_chunks, c]
        y = jnp.take_along_axis(jnp.broadcast_to(x, full), perm, axis=3)
        return _chunks(y, n_chunks, axis=3)

    sq = gather(item_q)                                    # [B, H, R, n, c, D]
    sk = _with_previous(gather(item_k), axis=3)            # [B, H, R, n, 2c, D]
    sv = _with_previous(gather(item_v), axis=3)            # [B, H, R, n, 2c, Dv]
    kmask = gather_flat((key_real & is_key[None, :])[:, None, None, :])
    first = jnp.arange(n_chunks) == 0                      # no chunk before the first
    kmask = _with_previous(kmask, axis=3)
    prev_ok = jnp.concatenate([jnp.broadcast_to(~first[:, None], (n_chunks, c)),
                               jnp.ones((n_chunks, c), bool)], axis=1)  # [n, 2c]
    mask = kmask[..., None, :] & prev_ok[:, None, :]       # [B, H, R, n, c(q), 2c(k)]

    spos = gather_flat(pos[None, None, None, :])           # [B, H, R, n, c]
    kpos = _with_previous(spos, axis=3)
    if causal:
        sbucket = gather_flat(bucket)
        kbucket = _with_previous(sbucket, axis=3)
        rank = _chunks(iota, n_chunks, axis=3)
        krank = _with_previous(rank, axis=3)
        win = jnp.asarray(window).reshape((-1,) + (1,) * 5)
        mask = (mask & (kbucket[..., None, :] == sbucket[..., :, None])
                & (kpos[..., None, :] <= spos[..., :, None])
                & (rank[..., :, None] - krank[..., None, :] < win))
    if exclude_self:
        is_self = kpos[..., None, :] == spos[..., :, None]
        others = jnp.any(mask & ~is_self, axis=-1, keepdims=True)
        mask = mask & (~is_self | ~others)

    logits = jnp.einsum("bhrnqd,bhrnkd->bhrnqk", sq, sk,
                        preferred_element_type=jnp.float32) * scale
    out, lse = attend(logits, mask, sv)                    # [B, H, R, n, c, Dv], [.., n, c]
    out = out.reshape(b, h, r, n_pad, -1)
    lse = lse.reshape(b, h, r, n_pad)
    inverse = jnp.argsort(perm, axis=-1)                   # item -> sorted slot
    out = jnp.take_along_axis(out, inverse[..., None], axis=3)[:, :, :, :n]
    lse = jnp.take_along_axis(lse, inverse, axis=3)[:, :, :, :n]
    return out, lse
