"""Context parallelism: one sequence split over the devices of a mesh axis, on jax.shard_map.

    out = context_parallel.attend("dense", q, k, v, kv_mask=m, causal=True, mesh=mesh)

Same contract and same result as `attention.get(name)(q, k, v, ...)` on one device; q, k, v's
length axis is split over `seq_axis` (and the batch over `batch_axis` when the mesh has it).
A length that the split does not divide is padded at the end and masked. The forms:

- ring (dense, blockwise): Ring Attention (Liu et al. 2023). Each device keeps its queries;
  key/value blocks travel around the ring (ppermute), merged by an online softmax (running max
  and sum), so no device ever holds more than two key blocks. Causal runs in zigzag order (the
  sequence cut into 2s chunks, device i holding chunks i and 2s-1-i): every off-diagonal ring
  step then needs exactly half a block, so no device idles half the ring. Gradients by AD
  through the ring (ppermute's transpose sends the cotangents back).
- halo (local): sliding-window attention needs only the `window` keys on either side of a
  shard, taken from the two neighbours (one ppermute each way); the registered variant then
  runs on [left halo, shard, right halo]. Needs window <= shard length, else gather.
- window_global (longformer, sliding_sink): the halo for the window, the g global keys from the
  first device, longformer's global query rows merged over the devices by their softmax
  statistics (attention/_cp_window.py). Needs window and g <= the shard length, else gather.
- kv_state (linear, performer): the kernel sums sum_j phi(k_j) [v_j, 1]: summed over shards
  (psum; the performer's key stabiliser is the max over every shard, pmax), or, causal, an
  exclusive prefix over the shards before this one plus a chunked scan inside. The causal
  performer (favor+, exp) keeps one device's stabiliser, the running max of the real keys' log
  features up to each position: the earlier shards' maxima (all_gather) under this shard's
  running max give one device's ref (a max adds no rounding; ref is per position, so shard and
  chunk boundaries need not align); each shard's state against its last ref is all_gathered and
  the earlier ones, rescaled to this shard's incoming max (weights <= 1), start its scan.
- masked_ring (sparse, strided, sparse_fixed, bigbird): the fixed pattern restricted to each
  (query shard, key shard) pair, in the pattern's own compact layout (attention/_cp_window.py):
  the key/value shards rotate as in the ring, each step's pairs merged by the online softmax.
  sparse / strided: the strided pairs as residue classes per shard pair (shards padded to a
  multiple of the stride), sparse's band from the halo; sparse_fixed: the own block inside the
  shard (padded to whole blocks), only the summary keys rotate; bigbird: window blocks from the
  halo, global key blocks from the devices holding them, random blocks (a traced buffer, so no
  step is skipped statically) collected while the shards pass, global query rows merged by
  their softmax statistics. Causal: key shards after the query shard are skipped per device
  (lax.cond). Needs the window (blocks) <= the shard length, else gather.
- gather (every other variant, and dropout on attention weights): all-gather q, k, v and the
  mask, compute the registered variant on the whole sequence on every device, keep this
  shard's rows. Always the single-device answer, at the single-device cost in memory and FLOPs
  per device (plus the gather): no saving, but never a wrong result.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from attention import get as get_variant
from attention._util import NEG_INF
from attention import _cp_window, performer
from attention.linear import elu_feature

FORMS = {"dense": "ring", "blockwise": "ring", "local": "halo", "linear": "kv_state",
         "longformer": "window_global", "sliding_sink": "window_global",
         **{name: "masked_ring" for name in _cp_window.MASKED}}


def seq_shards(mesh=None, seq_axis: str = "seq") -> int:
    """Devices the sequence is split over: the size of `seq_axis` in `mesh` (default: the mesh
    set by jax.set_mesh), 1 without one."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return mesh.shape[seq_axis] if seq_axis in mesh.axis_names else 1


def shard_sequence(x, seq_axis: str = "seq", batch_axis: str = "data"):
    """Activations [B, T, ...] sharded over batch and length when the mesh set by jax.set_mesh
    splits the sequence (XLA pads a length the split does not divide); x unchanged otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if seq_shards(mesh, seq_axis) == 1:
        return x
    data = batch_axis if batch_axis in mesh.axis_names else None
    return jax.lax.with_sharding_constraint(x, P(data, seq_axis))


def form_of(name: str, hparams: dict, shard_len: int, causal: bool = False) -> str:
    """The context-parallel form `attend` uses for a variant at this shard length."""
    form = FORMS.get(name, "gather")
    if name == "performer":
        form = "kv_state"        # causal: the running key stabiliser from the earlier shards
    if hparams.get("dropout_rate", 0.0) > 0:
        return "gather"          # dropout on attention weights: the variant's own draw
    if form == "halo" and int(hparams.get("window", 0)) > shard_len:
        return "gather"          # the window reaches past the neighbouring shard
    if form == "window_global" and not _cp_window.fits(name, hparams, shard_len):
        return "gather"          # the window or the global keys reach past one shard
    if form == "masked_ring" and not _cp_window.masked_fits(name, hparams, shard_len):
        return "gather"          # the window (blocks) reach past the neighbouring shard
    return form


def zigzag_order(length: int, shards: int) -> np.ndarray:
    """Global positions in device order: device i holds chunks i and 2s-1-i (of 2s chunks)."""
    c = length // (2 * shards)
    chunks = np.arange(length).reshape(2 * shards, c)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]])
                           for i in range(shards)])


def attend(name, q, k, v, *, kv_mask=None, causal=False, mesh=None, seq_axis="seq",
           batch_axis="data", **kwargs):
    """The registered variant `name` with q, k, v's length split over `seq_axis` of `mesh`
    (default: the mesh set by jax.set_mesh). q, k, v: [B, T, H, D]; kv_mask: bool [B, T].
    kwargs: as for the variant itself (hyperparameters, defaults filled; state arrays; impl;
    dropout)."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    variant = get_variant(name)
    shards = seq_shards(mesh, seq_axis)
    if shards == 1:
        return variant(q, k, v, kv_mask=kv_mask, causal=causal, **kwargs)
    given = {n: kwargs.pop(n) for n in list(kwargs) if n in variant.hparams}
    hparams = {**kwargs, **variant.resolve(given)}
    if causal and not variant.supports_causal:
        raise ValueError(f"attention variant {name!r} cannot be causal (causal=True given)")
    b, t = q.shape[:2]
    mask = jnp.ones((b, t), bool) if kv_mask is None else kv_mask
    hparams = _cp_window.resolve_sqrt(name, hparams, t)  # "sqrt" at the unpadded length
    multiple = 2 * shards                              # zigzag needs 2s equal chunks
    padded = -(-t // multiple) * multiple
    form = form_of(name, hparams, padded // shards, causal)
    if form == "masked_ring":  # shards a multiple of the stride / bigbird's block size
        multiple = shards * _cp_window.masked_multiple(name, hparams)
        padded = -(-t // multiple) * multiple
        form = form_of(name, hparams, padded // shards, causal)
    if padded != t:
        pad = ((0, 0), (0, padded - t))
        q, k, v = (jnp.pad(x, pad + ((0, 0), (0, 0))) for x in (q, k, v))
        mask = jnp.pad(mask, pad)
    zigzag = form == "ring" and causal
    if zigzag:
        order = zigzag_order(padded, shards)
        q, k, v, mask = (jnp.take(x, order, axis=1) for x in (q, k, v, mask))
    arrays = {n: a for n, a in hparams.items() if isinstance(a, (jax.Array, np.ndarray))}
    static = {n: a for n, a in hparams.items() if n not in arrays}
    if form == "masked_ring":
        static["length"] = t                           # bigbird's blocks: those of length t
    local = functools.partial(_LOCAL[form], name=name, causal=causal, axis=seq_axis,
                              shards=shards, static=static)
    data = batch_axis if batch_axis in mesh.axis_names else None
    spec = P(data, seq_axis)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec, P()),
                        out_specs=spec, check_vma=False)(q, k, v, mask, arrays)
    if zigzag:
        out = jnp.take(out, np.argsort(order), axis=1)
    return out[:, :t]


# --- ring ---------------------------------------------------------------------------------------

def _block(q, k, v, visible, scale):
    """Softmax statistics of one query block against one key block: (max [B, H, Tq], sum,
    weighted values [B, H, Tq, D]); rows with no visible key give (NEG_INF, 0, 0)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(visible, s, NEG_INF)
    m = jnp.max(s, axis=-1)
    p = jnp.where(visible, jnp.exp(s - m[..., None]), 0.0)
    acc = jnp.einsum("bhqk,bkhd->bhqd", p, v.astype(jnp.float32))
    return m, p.sum(-1), acc


def _merge(a, b):
    m = jnp.maximum(a[0], b[0])
    wa, wb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, a[1] * wa + b[1] * wb, a[2] * wa[..., None] + b[2] * wb[..., None]


def _rows(stats, rows: slice, n: int):
    """Statistics of a block of query rows placed into all n rows (others empty)."""
    m, l, acc = stats
    full = lambda x, fill: jnp.full(x.shape[:2] + (n,) + x.shape[3:], fill, x.dtype)  # noqa: E731
    return (full(m, NEG_INF).at[:, :, rows].set(m), full(l, 0.0).at[:, :, rows].set(l),
            full(acc, 0.0).at[:, :, rows].set(acc))


def _ring_local(q, k, v, mask, arrays, *, name, causal, axis, shards, static):
    del name, arrays, static
    n, scale = q.shape[1], 1.0 / math.sqrt(q.shape[-1])
    i = jax.lax.axis_index(axis)
    half = n // 2
    key_mask = lambda m: m[:, None, None, :]  # noqa: E731  [B, 1, 1, Tk]
    if causal:  # the own block: its early chunk precedes its late one, so causal = lower triangle
        tril = jnp.tril(jnp.ones((n, n), bool))
        stats = _block(q, k, v, key_mask(mask) & tril, scale)
    else:
        stats = _block(q, k, v, key_mask(mask), scale)
    perm = [(j, (j + 1) % shards) for j in range(shards)]
    kb, vb, mb = k, v, mask
    for step in range(1, shards):
        kb, vb, mb = jax.lax.ppermute((kb, vb, mb), axis, perm)
        if not causal:
            stats = _merge(stats, _block(q, kb, vb, key_mask(mb), scale))
            continue
        src = (i - step) % shards

        def earlier(kb=kb, vb=vb, mb=mb):  # src < i: every query sees the src's first chunk
            return _block(q, kb[:, :half], vb[:, :half], key_mask(mb[:, :half]), scale)

        def later(kb=kb, vb=vb, mb=mb):    # src > i: only the late chunk sees all of src
            return _rows(_block(q[:, half:], kb, vb, key_mask(mb), scale), slice(half, n), n)

        stats = _merge(stats, jax.lax.cond(src < i, earlier, later))
    m, l, acc = stats
    out = jnp.where((l > 0)[..., None], acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)                  # [B, Tq, H, D]


# --- halo ---------------------------------------------------------------------------------------

def _halo_local(q, k, v, mask, arrays, *, name, causal, axis, shards, static):
    w = int(static["window"])
    if w == 0:  # each query sees itself only
        return get_variant(name)(q, k, v, kv_mask=mask, causal=causal, **static, **arrays)
    qx, kx, vx, mx = _cp_window.halo(q, k, v, mask, w, axis, shards)
    out = get_variant(name)(qx, kx, vx, kv_mask=mx, causal=causal, **static, **arrays)
    return out[:, w:w + q.shape[1]]


# --- kv state -----------------------------------------------------------------------------------

def _features(name, q, k, keep, arrays, static, axis):
    """Query and key features [B, H, n, M] of the kernel variants, keys of padding zero; the
    performer's exponential key features against the max over every shard's real keys."""
    qt, kt = (jnp.swapaxes(x, 1, 2) for x in (q, k))                  # [B, H, n, D]
    if name == "linear":
        return elu_feature(qt), jnp.where(keep, elu_feature(kt), 0.0)
    w = performer.feature_weights(arrays.get("projection"), static["num_features"],
                                  static["feature_map"], q.shape[-1])
    if static["feature_map"] == "relu":
        phi = lambda x: jax.nn.relu(jnp.einsum(  # noqa: E731
            "bhtd,md->bhtm", x.astype(jnp.float32) * x.shape[-1] ** -0.25, w)) + 1e-3
        return phi(qt), jnp.where(keep, phi(kt), 0.0)
    lk = jnp.where(keep, performer._log_features(kt, w), NEG_INF)
    mx = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(lk, axis=(2, 3), keepdims=True)), axis)
    kf = jnp.where(keep, jnp.exp(lk - mx) + performer.NUMERICAL_STABILIZER, 0.0)
    return performer.query_features(qt, w), kf


def _kv_state_local(q, k, v, mask, arrays, *, name, causal, axis, shards, static):
    if name == "performer" and causal and static["feature_map"] != "relu":
        return _performer_causal_local(q, k, v, mask, arrays, axis=axis, shards=shards,
                                       static=static)
    keep = mask[:, None, :, None]
    qf, kf = _features(name, q, k, keep, arrays, static, axis)
    vt = jnp.swapaxes(v, 1, 2).astype(jnp.float32)
    v1 = jnp.concatenate([jnp.where(keep, vt, 0.0), jnp.ones(vt.shape[:-1] + (1,))], -1)
    state = jnp.einsum("bhtm,bhtd->bhmd", kf, v1)                     # [B, H, M, Dv + 1]
    if not causal:
        out = jnp.einsum("bhqm,bhmd->bhqd", qf, jax.lax.psum(state, axis))
    else:
        every = jax.lax.all_gather(state, axis)                        # [s, B, H, M, Dv + 1]
        before = jnp.arange(shards) < jax.lax.axis_index(axis)
        prefix = jnp.einsum("s,sbhmd->bhmd", before.astype(jnp.float32), every)
        out = _causal_kernel(qf, kf, v1, prefix, int(static["chunk_size"]))
    num, den = out[..., :-1], out[..., -1]
    out = jnp.where((den > 0)[..., None], num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def _causal_kernel(qf, kf, v1, prefix, chunk):
    """phi(q_i) . (prefix + sum_{j <= i} phi(k_j) v1_j) by chunks: exclusive chunk sums plus the
    exact lower triangle inside a chunk. [B, H, n, M], [B, H, n, M], [B, H, n, F] -> [.., F]."""
    b, h, n, _ = qf.shape
    c = min(n, chunk)
    m = -(-n // c) * c          # the shard padded to whole chunks (zero features: no term)

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, 0), (0, m - n), (0, 0)))
        return x.reshape(b, h, m // c, c, x.shape[-1])
    qc, kc, vc = split(qf), split(kf), split(v1)
    sums = jnp.einsum("bhncm,bhncf->bhnmf", kc, vc)                     # per chunk
    before = jnp.cumsum(sums, axis=2) - sums + prefix[:, :, None]       # exclusive + prefix
    inter = jnp.einsum("bhncm,bhnmf->bhncf", qc, before)
    scores = jnp.einsum("bhncm,bhnkm->bhnck", qc, kc) * jnp.tril(jnp.ones((c, c)))
    intra = jnp.einsum("bhnck,bhnkf->bhncf", scores, vc)
    return (inter + intra).reshape(b, h, m, -1)[:, :, :n]


def _performer_causal_local(q, k, v, mask, arrays, *, axis, shards, static):
    """Causal performer (favor+, exp) on one shard, the numbers of attention/_linearized.py's
    causal k_log scan: key j enters query i as exp(log phi(k_j) - ref_i) + 1e-6, ref_i the max
    of the real keys' logs at positions <= i over the WHOLE sequence. ref is per position (a
    running max; chunk boundaries only order the sums), and a max adds no rounding, so the split
    ref is the one-device ref: the max of the earlier shards' key maxima (all_gather of
    [B, H] per shard), then this shard's running max on top. Chunk states are kept against their
    chunk's last ref and scanned as on one device; each shard's total (against its last ref) and
    its plain sum of [v, 1] (the 1e-6 term) are all_gathered and the earlier shards' totals,
    rescaled by exp(end_s - ref_before) <= 1, are the prefix every chunk here starts from."""
    w = performer.feature_weights(arrays.get("projection"), static["num_features"],
                                  static["feature_map"], q.shape[-1])
    b, n, h, _ = q.shape
    c = min(int(static["chunk_size"]), n)
    pad = -(-n // c) * c - n
    nc = (n + pad) // c
    keep = mask[:, None, :, None]                                      # [B, 1, n, 1]
    qt, kt = (jnp.swapaxes(x, 1, 2) for x in (q, k))                   # [B, H, n, D]
    lk = jnp.where(keep, performer._log_features(kt, w), NEG_INF)      # [B, H, n, M]
    vt = jnp.where(keep, jnp.swapaxes(v, 1, 2).astype(jnp.float32), 0.0)
    v1 = jnp.concatenate([vt, jnp.broadcast_to(keep, vt.shape[:-1] + (1,)).astype(
        jnp.float32)], -1)                                             # [v, 1], padding 0
    qf = performer.query_features(qt, w)

    def chunks(x, fill=0.0):  # [B, H, n, F] -> [B, H, nc, c, F]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=fill)
        return x.reshape(b, h, nc, c, x.shape[-1])
    qc, lkc, vc = chunks(qf), chunks(lk, NEG_INF), chunks(v1)
    here = jax.lax.axis_index(axis)
    before = jnp.arange(shards) < here                                 # [s]
    run = jax.lax.stop_gradient(jax.lax.cummax(jnp.max(lkc, -1).reshape(b, h, nc * c), axis=2))
    maxima = jax.lax.all_gather(run[..., -1], axis)                    # [s, B, H]
    ref_in = jnp.max(jnp.where(before[:, None, None], maxima, NEG_INF), axis=0)   # [B, H]
    ref = jnp.maximum(run, ref_in[..., None]).reshape(b, h, nc, c)     # one device's ref
    end = ref[..., -1]                                                 # [B, H, nc]
    kin = jnp.where(vc[..., -1:] > 0, jnp.exp(lkc - ref[..., None]), 0.0)  # <= 1; padding 0
    kst = kin * jnp.exp(ref - end[..., None])[..., None]               # against the chunk end
    sums = jnp.einsum("bhnck,bhncf->bhnkf", kst, vc)                   # [B, H, nc, M, F]

    def combine(x, y):
        mx = jnp.maximum(x[0], y[0])
        return mx, (x[1] * jnp.exp(x[0] - mx)[..., None, None]
                    + y[1] * jnp.exp(y[0] - mx)[..., None, None])
    mp, sp = jax.lax.associative_scan(combine, (end, sums), axis=2)    # inclusive, this shard
    every_end, every_sum, every_v1 = jax.lax.all_gather(
        (mp[..., -1], sp[:, :, -1], jnp.sum(v1, axis=2)), axis)        # [s, B, H, ...]
    scale = jnp.where(before[:, None, None],
                      jnp.exp(jnp.minimum(every_end - ref_in, 0.0)), 0.0)       # [s, B, H]
    prefix = jnp.einsum("sbh,sbhmf->bhmf", scale, every_sum)           # against ref_in
    v1_in = jnp.einsum("s,sbhf->bhf", before.astype(jnp.float32), every_v1)
    # exclusive over chunks, the earlier shards' prefix first
    mp = jnp.concatenate([jnp.full_like(mp[:, :, :1], NEG_INF), mp[:, :, :-1]], axis=2)
    sp = jnp.concatenate([jnp.zeros_like(sp[:, :, :1]), sp[:, :, :-1]], axis=2)
    mp, sp = combine((ref_in[..., None], prefix[:, :, None]), (mp, sp))
    a_prev = jnp.exp(mp[..., None] - ref)                              # [B, H, nc, c] <= 1
    tril = jnp.tril(jnp.ones((c, c), bool))
    pair = jnp.where(tril, jnp.exp(jnp.minimum(ref[..., None, :] - ref[..., :, None], 0.0)),
                     0.0)                                              # [.., c(q), c(k)]
    scores = jnp.einsum("bhnqm,bhnkm->bhnqk", qc, kin) * pair
    out = (a_prev[..., None] * jnp.einsum("bhnqm,bhnmf->bhnqf", qc, sp)
           + jnp.einsum("bhnqk,bhnkf->bhnqf", scores, vc))
    # + 1e-6 on every visible key feature: 1e-6 phi(q_i) . 1 times the prefix sum of [v, 1]
    seen = (jnp.cumsum(vc.reshape(b, h, nc * c, -1), axis=2) + v1_in[:, :, None]).reshape(
        vc.shape)
    out = out + performer.NUMERICAL_STABILIZER * jnp.sum(qc, -1, keepdims=True) * seen
    out = out.reshape(b, h, nc * c, -1)[:, :, :n]
    num, den = out[..., :-1], out[..., -1]
    out = jnp.where((den > 0)[..., None], num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


# --- gather -------------------------------------------------------------------------------------

def _gather_local(q, k, v, mask, arrays, *, name, causal, axis, shards, static):
    del shards
    whole = [jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (q, k, v, mask)]
    out = get_variant(name)(*whole[:3], kv_mask=whole[3], causal=causal, **static, **arrays)
    n = q.shape[1]
    return jax.lax.dynamic_slice_in_dim(out, jax.lax.axis_index(axis) * n, n, axis=1)


_LOCAL = {"ring": _ring_local, "halo": _halo_local, "kv_state": _kv_state_local,
          "window_global": _cp_window.window_global_local,
          "masked_ring": _cp_window.masked_ring_local, "gather": _gather_local}
