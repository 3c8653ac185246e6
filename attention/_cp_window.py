"""The context-parallel form of window + global-key patterns (longformer, sliding_sink), used by
attention/context_parallel.py inside its shard_map (one device's shard of n positions).

Every query sees its window and the first g keys of the sequence (longformer's global tokens,
sliding_sink's sinks); longformer's first g queries also see every key. So a device needs:
- its two neighbours' `window` edge keys (halo, one ppermute each way), for the banded part;
- the g global keys, which live on the first device (a psum of [B, g, H, D] from it);
- for longformer's global queries (rows 0..g-1, on the first device): each device's softmax
  statistics of those g queries against its own keys, merged over the devices (pmax of the
  running max, psum of the rescaled sums) - O(g * n) per device.
One softmax per row with each pair counted once, as the single-device variants compute it; the
cost per device is O(n * (window + g)) plus g rows over its n keys. Needs window <= n and g <= n
(else the caller gathers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention import patterns
from attention._banded import band, unblock
from attention._blocks import Partial, heads_first, merge, pair_mask, partial_attention

GLOBAL_FIELD = {"longformer": "num_global", "sliding_sink": "num_sink"}


def fits(name: str, hparams: dict, shard_len: int) -> bool:
    """Whether the window and the global keys fit in one shard (else the caller gathers)."""
    return (int(hparams.get("window", 0)) <= shard_len
            and int(hparams.get(GLOBAL_FIELD[name], 0)) <= shard_len)


def _from_first(x, index, axis):
    """The first device's x on every device (the others contribute zeros to a psum)."""
    return jax.lax.psum(jnp.where(index == 0, x, jnp.zeros_like(x)), axis)


def halo(q, k, v, mask, w: int, axis, shards: int):
    """[left halo; shard; right halo] of k, v and the mask: the window's `w` edge keys from the
    two neighbours (one ppermute each way; absent at the ends, so masked), and q with zero rows
    in the halo positions (their outputs are dropped). w >= 1."""
    fwd = [(j, j + 1) for j in range(shards - 1)]    # to the next device (its left halo)
    bwd = [(j + 1, j) for j in range(shards - 1)]    # to the previous one (its right halo)
    left = jax.lax.ppermute((k[:, -w:], v[:, -w:], mask[:, -w:]), axis, fwd)
    right = jax.lax.ppermute((k[:, :w], v[:, :w], mask[:, :w]), axis, bwd)
    cat = lambda a, b, c: jnp.concatenate([a, b, c], axis=1)  # noqa: E731
    kx, vx, mx = (cat(a, b, c) for a, b, c in zip(left, (k, v, mask), right))
    return cat(jnp.zeros_like(q[:, :w]), q, jnp.zeros_like(q[:, :w])), kx, vx, mx


def _every(i, j):
    return (i == i) & (j == j)


def window_global_local(q, k, v, mask, arrays, *, name, causal, axis, shards, static):
    """One device's rows of longformer / sliding_sink over the split sequence."""
    w, g = int(static["window"]), int(static[GLOBAL_FIELD[name]])
    n = q.shape[1]
    index = jax.lax.axis_index(axis)
    start = index * n                                  # true position of this shard's row 0
    if w > 0:   # the window's keys from the neighbours ([left, shard, right])
        qx, kx, vx, mx = halo(q, k, v, mask, w, axis, shards)
    else:
        qx, kx, vx, mx = q, k, v, mask
    qb, kb, vb, kvb, pos_q, pos_k = band(heads_first(qx), heads_first(kx), heads_first(vx), mx,
                                         window=w, causal=causal)
    shift = start - w                                  # X position 0 is true position start - w
    band_only = lambda i, j: patterns.local(i, j, window=w) & (j >= g)  # noqa: E731
    groups = [(kb, vb, pair_mask(band_only, pos_q + shift, pos_k + shift, kvb, causal))]
    if g > 0:
        gk, gv = (heads_first(_from_first(x[:, :g], index, axis)) for x in (k, v))
        gm = _from_first(mask[:, :g].astype(jnp.int32), index, axis) > 0
        groups.append((gk, gv, pair_mask(_every, pos_q + shift, np.arange(g), gm, causal)))
    part = partial_attention(qb, groups)
    parts = [part]
    if name == "sliding_sink" and static.get("learned_sink", False):
        from attention.sinks import sink_partial
        parts.append(sink_partial(arrays["sink"], part))
    out = unblock(merge(*parts))[:, :, w:w + n]        # [B, H, n, Dv], this shard's rows
    if name == "longformer" and g > 0:
        out = _global_rows(out, q, k, v, mask, index, start, g, causal, axis)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def _global_rows(out, q, k, v, mask, index, start, g, causal, axis):
    """Longformer's global queries (true rows 0..g-1) over every device's keys, written into
    the first device's rows."""
    gq = heads_first(_from_first(q[:, :g], index, axis))[:, :, None]      # [B, H, 1, g, D]
    pos_k = start + jnp.arange(k.shape[1])
    visible = pair_mask(_every, np.arange(g)[None], pos_k[None], mask[:, None], causal)
    part = partial_attention(gq, [(heads_first(k), heads_first(v), visible)])
    top = jax.lax.stop_gradient(jax.lax.pmax(part.m, axis))
    scale = jnp.exp(part.m - top)
    merged = Partial(jax.lax.psum(part.o * scale[..., None], axis), top,
                     jax.lax.psum(part.l * scale, axis))
    rows = merge(merged)[:, :, 0]                                         # [B, H, g, Dv]
    first = (index == 0) & (jnp.arange(out.shape[2]) < g)[None, None, :, None]
    return jnp.where(first, jnp.pad(rows, ((0, 0), (0, 0), (0, out.shape[2] - g), (0, 0))), out)
