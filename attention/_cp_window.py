"""The context-parallel forms of the fixed patterns, used by attention/context_parallel.py inside
its shard_map (one device's shard of n positions): window + global keys (longformer,
sliding_sink) here, the masked ring (sparse, strided, sparse_fixed, bigbird) further down.

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
from attention._blocks import (
    Partial, heads_first, merge, merge_axes, pair_mask, partial_attention, to_blocks)

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


# --- masked ring: sparse, strided, sparse_fixed, bigbird ------------------------------------------
#
# Each device keeps its queries; the key/value shards rotate around the ring (ppermute), so at
# step s device i holds the shard of device (i - s) mod P. What a pair (query shard i, key shard
# j) needs is the pattern restricted to the pair, computed in the pattern's own compact layout
# (never a dense shard x shard score block):
# - sparse, strided: the strided pairs (i - j) mod stride == 0 as residue classes. The shard
#   length is a multiple of the stride (the caller pads), so position u * stride + a of every
#   shard is in class a, and a pair's strided part is stride blocks of (n / stride)^2 scores,
#   n^2 / stride per pair, merged over the steps by the online softmax. Causal: key shards after
#   the query shard are empty, skipped per device (lax.cond). sparse's band |i - j| <= window
#   comes from the halo (neighbours only) and is merged with the strided part, each pair once.
# - sparse_fixed: the own block lies inside the shard (padded to whole blocks); only the
#   summary keys (the last `summary` of every block, n * summary / block_size per shard) rotate,
#   each step n * (n * summary / block_size) scores.
# - bigbird: the window blocks from the halo; the global key blocks from the devices that hold
#   them (a psum of [B, g * block_size, H, D]); the random blocks (a buffer, traced, anywhere in
#   the sequence) collected while the shards pass (a select into [B, H, blocks, r * block, D]
#   when the passing shard owns them), then one softmax over window, global and random blocks as
#   on one device; the global query rows over every device's keys merged by their softmax
#   statistics (pmax / psum), as longformer's. Without random blocks nothing rotates.

MASKED = ("sparse", "strided", "sparse_fixed", "bigbird")


def resolve_sqrt(name: str, hparams: dict, length: int) -> dict:
    """sparse / strided's window and stride "sqrt" as the integer the variant uses at this
    sequence length (ceil(sqrt(length)) of the unpadded length)."""
    if name not in ("sparse", "strided"):
        return hparams
    from attention._util import or_sqrt
    return {**hparams, **{f: or_sqrt(hparams[f], length) for f in ("window", "stride")
                          if f in hparams}}


def masked_multiple(name: str, hparams: dict) -> int:
    """Every shard's length is padded to a multiple of this: the stride (residue classes align
    with the shards), bigbird's block size (blocks do not straddle shards)."""
    return int(hparams["stride"] if name in ("sparse", "strided") else hparams["block_size"])


def masked_fits(name: str, hparams: dict, shard_len: int) -> bool:
    """Whether the halo part fits in one neighbour (else the caller gathers)."""
    if name == "sparse":
        w = hparams["window"]
        return w == "sqrt" or int(w) <= shard_len
    if name == "bigbird":
        c = int(hparams["block_size"])
        return (int(hparams["num_window_blocks"]) // 2) * c <= -(-shard_len // c) * c
    return True


def _empty(shape_m, dv):
    """Statistics of no key: m = NEG_INF, l = 0, o = 0 (o [..., dv])."""
    from attention._util import NEG_INF
    return Partial(jnp.zeros(shape_m + (dv,), jnp.float32), jnp.full(shape_m, NEG_INF),
                   jnp.zeros(shape_m, jnp.float32))


def _combine(a: Partial, b: Partial) -> Partial:
    """Unnormalised statistics of two disjoint sets of keys (the online softmax step)."""
    m = jnp.maximum(a.m, b.m)
    wa, wb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return Partial(a.o * wa[..., None] + b.o * wb[..., None], m, a.l * wa + b.l * wb)


def _rotate(xs, axis, shards: int):
    """Every device's arrays to the next device around the ring."""
    return jax.lax.ppermute(xs, axis, [(j, (j + 1) % shards) for j in range(shards)])


def _ring(pair, kv, index, causal: bool, axis, shards: int) -> Partial:
    """Online softmax of this shard's queries over every shard's keys: pair(*kv, src) gives the
    statistics against the key arrays kv of shard src; kv rotates around the ring. Causal: the
    key shards after this one (src > index: the steps s > index) are skipped on this device."""
    total = pair(*kv, index)
    for step in range(1, shards):
        kv = _rotate(kv, axis, shards)
        src = (index - step) % shards
        if causal:
            part = jax.lax.cond(index >= step, lambda kv=kv, src=src: pair(*kv, src),
                                lambda: _empty(total.m.shape, total.o.shape[-1]))
        else:
            part = pair(*kv, src)
        total = _combine(total, part)
    return total


def masked_ring_local(q, k, v, mask, arrays, *, name, causal, axis, shards, static):
    """One device's rows of sparse / strided / bigbird over the split sequence."""
    if name == "bigbird":
        return _bigbird_local(q, k, v, mask, arrays, causal=causal, axis=axis, shards=shards,
                              static=static)
    if name == "sparse_fixed":
        return _fixed_local(q, k, v, mask, causal=causal, axis=axis, shards=shards,
                            static=static)
    return _strided_local(q, k, v, mask, name=name, causal=causal, axis=axis, shards=shards,
                          static=static)


def _strided_local(q, k, v, mask, *, name, causal, axis, shards, static):
    stride = int(static["stride"])
    w = int(static.get("window", 0))
    n = q.shape[1]
    index = jax.lax.axis_index(axis)
    start = index * n
    local = lambda i, j: patterns.local(i, j, window=w)  # noqa: E731
    if name == "sparse":   # the strided pairs outside the band (the band is the halo part)
        keep = lambda i, j: patterns.strided(i, j, stride=stride) & ~local(i, j)  # noqa: E731
    else:
        keep = lambda i, j: patterns.strided(i, j, stride=stride)  # noqa: E731

    def classes(x, ax):  # [.., n, ..] -> [.., stride, n // stride, ..]: position u * stride + a
        return to_blocks(x, stride, ax).swapaxes(ax, ax + 1)

    def ungroup(x):      # [B, H, stride, n // stride, ...] -> [B, H, n, ...]
        return merge_axes(jnp.swapaxes(x, 2, 3), 2)

    offsets = classes(np.arange(n), 0)                             # [stride, n // stride]
    qg = classes(heads_first(q), 2)                                # [B, H, stride, n/stride, D]

    def pair(kb, vb, mb, src):  # this shard's queries against key shard src
        visible = pair_mask(keep, start + offsets, src * n + offsets, classes(mb, 1), causal)
        return partial_attention(qg, [(classes(heads_first(kb), 2), classes(heads_first(vb), 2),
                                       visible)])

    far = _ring(pair, (k, v, mask), index, causal, axis, shards)
    parts = [far.map(ungroup)]
    if name == "sparse":   # the band abs(i - j) <= window: the halo's keys
        if w > 0:
            qx, kx, vx, mx = halo(q, k, v, mask, w, axis, shards)
        else:
            qx, kx, vx, mx = q, k, v, mask
        qb, kbb, vbb, kvb, pos_q, pos_k = band(heads_first(qx), heads_first(kx), heads_first(vx),
                                               mx, window=w, causal=causal)
        shift = start - w
        near = partial_attention(qb, [(kbb, vbb, pair_mask(local, pos_q + shift, pos_k + shift,
                                                           kvb, causal))])
        parts.append(near.map(lambda x: unblock(x)[:, :, w:w + n]))
    return jnp.swapaxes(merge(*parts), 1, 2).astype(v.dtype)


def _fixed_local(q, k, v, mask, *, causal, axis, shards, static):
    """sparse_fixed: the own block (inside the shard: its length is a multiple of block_size)
    and the summary keys of every other block, the shards' summary keys (n * summary /
    block_size of them) rotating around the ring."""
    bs, summary = int(static["block_size"]), int(static["summary"])
    n = q.shape[1]
    index = jax.lax.axis_index(axis)
    keep = lambda i, j: patterns.sparse_fixed(i, j, block_size=bs, summary=summary)  # noqa: E731
    qb, kb, vb = (to_blocks(heads_first(x), bs, 2) for x in (q, k, v))      # [B, H, nb, bs, D]
    pos = index * n + to_blocks(np.arange(n), bs, 0)                        # [nb, bs]
    parts = [partial_attention(qb, [(kb, vb, pair_mask(keep, pos, pos, to_blocks(mask, bs, 1),
                                                       causal))])]
    if summary > 0:
        offsets = np.nonzero(np.arange(n) % bs >= bs - summary)[0]          # same in every shard
        other = lambda i, j: keep(i, j) & (i // bs != j // bs)  # noqa: E731

        def pair(ks, vs, ms, src):
            visible = pair_mask(other, pos, src * n + offsets, ms, causal)
            return partial_attention(qb, [(heads_first(ks), heads_first(vs), visible)])
        parts.append(_ring(pair, (k[:, offsets], v[:, offsets], mask[:, offsets]), index,
                           causal, axis, shards))
    return jnp.swapaxes(merge_axes(merge(*parts), 2), 1, 2).astype(v.dtype)


def _from_owners(x, positions: np.ndarray, index, n: int, axis):
    """x [B, n, ...] of every device -> [B, len(positions), ...]: the values at those global
    positions, from the devices that hold them (a psum)."""
    owner, offset = positions // n, positions % n
    here = (owner[None, :] == index).reshape((1, -1) + (1,) * (x.ndim - 2))
    return jax.lax.psum(jnp.where(here, x[:, offset], jnp.zeros_like(x[:, offset])), axis)


def _bigbird_local(q, k, v, mask, arrays, *, causal, axis, shards, static):
    from attention.bigbird import _global_blocks
    c = int(static["block_size"])
    reach = int(static["num_window_blocks"]) // 2
    r = int(static["num_random_blocks"])
    t = int(static["length"])
    nb = -(-t // c)                          # bigbird's blocks of the unpadded sequence
    glob = _global_blocks(nb, int(static["num_global_blocks"]))
    n = q.shape[1]
    bpd = n // c                             # blocks per device
    index = jax.lax.axis_index(axis)
    start = index * n
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    qb = to_blocks(qh, c, 2)                                      # [B, H, bpd, c, D]
    pos = start + to_blocks(jnp.arange(n), c, 0)                  # [bpd, c] true positions
    after = 0 if causal else reach

    def windows(xb, ax):  # blocks u .. u + reach + after of [halo blocks; shard; halo blocks]
        cut = [slice(None)] * xb.ndim
        shifted = []
        for s in range(reach + 1 + after):
            cut[ax] = slice(s, s + bpd)
            shifted.append(xb[tuple(cut)])
        return merge_axes(jnp.stack(shifted, axis=ax + 1), ax + 1)

    # 1) window blocks qb - reach .. qb + reach: the halo's keys
    if reach > 0:
        _, kx, vx, mx = halo(q, k, v, mask, reach * c, axis, shards)
    else:
        kx, vx, mx = k, v, mask
    pos_x = to_blocks(start - reach * c + jnp.arange(n + 2 * reach * c), c, 0)
    groups = [(windows(to_blocks(heads_first(kx), c, 2), 2),
               windows(to_blocks(heads_first(vx), c, 2), 2),
               pair_mask(_every, pos, windows(pos_x, 0), windows(to_blocks(mx, c, 1), 1),
                         causal))]
    # 2) global key blocks (where not in the window), from the devices that hold them
    if glob:
        gpos = np.concatenate([np.arange(g * c, (g + 1) * c) for g in glob])
        gk, gv = (heads_first(_from_owners(x, gpos, index, n, axis)) for x in (k, v))
        gm = _from_owners(mask.astype(jnp.int32), gpos, index, n, axis) > 0
        outside = lambda i, j: jnp.abs(i // c - j // c) > reach  # noqa: E731
        groups.append((gk, gv, pair_mask(outside, pos, gpos, gm, causal)))
    # 3) random blocks (per head; not window, not global, not an earlier duplicate), collected
    #    from the key shards as they pass around the ring
    if r > 0:
        heads = q.shape[2]
        layout = arrays["random_layout"][:, :nb].astype(jnp.int32)            # [H, nb, r]
        layout = jnp.pad(layout, ((0, 0), (0, shards * bpd - nb), (0, 0)), constant_values=-1)
        rows = jax.lax.dynamic_slice_in_dim(layout, index * bpd, bpd, axis=1)  # [H, bpd, r]
        is_global = jnp.asarray(np.isin(np.arange(nb), glob))
        inside = (rows >= 0) & (rows < nb)
        safe = jnp.where(inside, rows, 0)
        earlier = jnp.tril(jnp.ones((r, r), bool), -1)
        dup = jnp.any((rows[..., :, None] == rows[..., None, :]) & earlier, axis=-1)
        qid = index * bpd + jnp.arange(bpd)
        fresh = inside & ~dup & ~is_global[safe] & (jnp.abs(qid[:, None] - rows) > reach)
        owner, offset = safe // bpd, safe % bpd
        hid = jnp.arange(heads)[:, None, None]
        kr = jnp.zeros(qb.shape[:3] + (r, c, k.shape[-1]), k.dtype)  # [B, H, bpd, r, c, D]
        vr = jnp.zeros(qb.shape[:3] + (r, c, v.shape[-1]), v.dtype)
        mr = jnp.zeros((q.shape[0], heads, bpd, r, c), bool)
        kc, vc, mc = k, v, mask
        for step in range(shards):
            if step:
                kc, vc, mc = _rotate((kc, vc, mc), axis, shards)
            sel = (owner == (index - step) % shards)[None, ..., None]     # [1, H, bpd, r, 1]
            kr = jnp.where(sel[..., None], to_blocks(heads_first(kc), c, 2)[:, hid, offset], kr)
            vr = jnp.where(sel[..., None], to_blocks(heads_first(vc), c, 2)[:, hid, offset], vr)
            mr = jnp.where(sel, to_blocks(mc, c, 1)[:, offset], mr)
        pos_r = (safe[..., None] * c + jnp.arange(c)).reshape(heads, bpd, r * c)
        visible = (jnp.repeat(fresh, c, axis=-1)[:, :, None, :]
                   & merge_axes(mr, 3)[:, :, :, None, :])                  # [B, H, bpd, c, r*c]
        if causal:
            visible = visible & (pos_r[:, :, None, :] <= pos[None, :, :, None])[None]
        groups.append((merge_axes(kr, 3), merge_axes(vr, 3), visible))
    out = merge_axes(merge(partial_attention(qb, groups)), 2)             # [B, H, n, Dv]
    # global query blocks see every key: their rows over every device's keys
    rows_g = np.concatenate([np.arange(g * c, (g + 1) * c) for g in glob]) if glob else []
    rows_g = np.asarray(rows_g, np.int64)
    rows_g = rows_g[rows_g < t]
    if rows_g.size:
        gq = heads_first(_from_owners(q, rows_g, index, n, axis))[:, :, None]  # [B, H, 1, R, D]
        pos_k = start + jnp.arange(n)
        visible = pair_mask(_every, rows_g[None], pos_k[None], mask[:, None], causal)
        part = partial_attention(gq, [(kh, vh, visible)])
        top = jax.lax.stop_gradient(jax.lax.pmax(part.m, axis))
        scale = jnp.exp(part.m - top)
        dense = merge(Partial(jax.lax.psum(part.o * scale[..., None], axis), top,
                              jax.lax.psum(part.l * scale, axis)))[:, :, 0]  # [B, H, R, Dv]
        owner = rows_g // n
        for d in np.unique(owner):
            mine = owner == d
            out = jnp.where(index == d, out.at[:, :, rows_g[mine] % n].set(dense[:, :, mine]),
                            out)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)
