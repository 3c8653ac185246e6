"""Chunked linear attention in Pallas (Katharopoulos et al., 2020, eq. 4-9; chunked as in
flash-linear-attention): out_i = phi(q_i)^T S_i / phi(q_i)^T z_i with S_i = sum_j phi(k_j) v_j^T
and z_i = sum_j phi(k_j), the sums over all j (non-causal) or over j <= i (causal).

The sequence is cut into chunks of C rows. A state pass per batch-head walks the chunks in order
and writes the state before each chunk (S_c, z_c: sums over the earlier chunks); a
chunk-parallel pass then gives num_c = phi(Q_c) S_c + tril(phi(Q_c) phi(K_c)^T) V_c and den_c
alike. Non-causal: one total state, no intra-chunk term. The backward pass has the same shape:
dphi(Q) from the forward states, dphi(K) and dV from reverse-cumulative states of
phi(Q)^T dnum (a reverse state pass), wired through jax.custom_vjp.

Exponential key features given as logarithms (Performer's FAVOR+, `k_log=True`) are stabilised
like attention/_linearized.py, plus the constant k_eps: non-causal against one max over real keys;
causal against the running max r_i of the keys up to position i, so nothing after a query enters
its arithmetic: key j is given as exp(log_j - r_j), enters its own chunk's queries with the pair
weight exp(r_j - r_i) <= 1 and the chunk state with exp(r_j - e_c) (e_c = r at the chunk's end);
the state passes carry S_{c+1} = e^{e_{c-1} - e_c} S_c + (chunk c's sums), and query i takes
the state with weight exp(e_{c-1} - r_i) <= 1. The k_eps part is prefix sums, outside the kernels.
The feature maps are the XLA variants' own, applied outside the
kernels, so both impls compute the same function; only the O(n) contractions run in Pallas.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import register_pallas
from attention._util import NEG_INF, check_causal, check_qkv
from attention.pallas.block_sparse import _pad_axis, _pow2_at_least, pick_block, resolve_interpret


@dataclasses.dataclass(frozen=True)
class _Config:
    chunk: int
    causal: bool
    scaled: bool          # running-max weights (k_log, causal): factor inputs are given
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None


def _params(cfg: _Config, f: int, dv: int):
    """Triton settings; a large [F, Dv] state (performer's 256 features) gets more warps."""
    if cfg.interpret:
        return None
    num_warps = cfg.num_warps or (8 if f * dv >= 128 * 64 else 4)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages or 2)


def _tril(c: int):
    r = jnp.arange(c, dtype=jnp.int32)
    return r[:, None] >= r[None, :]  # [C, C]: row i sees column j <= i


# ------------------------------------------------------------------------------ state passes


def _state_kernel(a_ref, b_ref, *refs, cfg: _Config, weighted: bool, reverse: bool):
    """Chunk states of sum_rows a^T b ([F, Dv]) and sum_rows w a ([F]).

    a_ref: [T, F]; b_ref: [T, Dv]; w_ref: [T] when weighted (else w = 1); decay_ref: [NC] when
    cfg.scaled (else 1): state <- decay[c] * state + (chunk c's sums).
    causal: s_ref [NC, F, Dv], z_ref [NC, F] get, per chunk, the state before the chunk is
    added (the sum over the earlier chunks; the later ones when reverse). Non-causal: s_ref
    [1, F, Dv], z_ref [1, F] get the total.
    """
    refs = list(refs)
    w_ref = refs.pop(0) if weighted else None
    decay_ref = refs.pop(0) if cfg.scaled else None
    s_ref, z_ref = refs
    c = cfg.chunk
    num_chunks = a_ref.shape[0] // c

    def body(t, carry):
        s, z = carry
        ci = num_chunks - 1 - t if reverse else t
        if cfg.causal:
            s_ref[ci] = s
            z_ref[ci] = z
        start = pl.multiple_of(ci * c, c)
        a = a_ref[pl.ds(start, c), :]
        b = b_ref[pl.ds(start, c), :]
        ds = plgpu.dot(a, b, trans_a=True)  # [F, Dv]
        af = a.astype(jnp.float32)
        if weighted:
            af = af * w_ref[pl.ds(start, c)][:, None]
        dz = jnp.sum(af, axis=0)
        if decay_ref is not None:
            s, z = s * decay_ref[ci], z * decay_ref[ci]
        return s + ds, z + dz

    init = (jnp.zeros(s_ref.shape[1:], jnp.float32), jnp.zeros(z_ref.shape[1:], jnp.float32))
    s, z = jax.lax.fori_loop(0, num_chunks, body, init)
    if not cfg.causal:
        s_ref[0] = s
        z_ref[0] = z


def _states(cfg: _Config, a, b, w=None, factors=(), *, reverse=False):
    """a: [B, T, H, F]; b: [B, T, H, Dv]; w: [B, H, T] or None; factors: (decay [B, H, NC],)
    when cfg.scaled.
    -> (S [B, H, NC', F, Dv], z [B, H, NC', F]) float32, NC' = T / chunk (causal) or 1."""
    batch, t, heads, f = a.shape
    dv = b.shape[-1]
    n = t // cfg.chunk if cfg.causal else 1
    in_specs = [pl.BlockSpec((None, t, None, f), lambda i, j: (i, 0, j, 0)),
                pl.BlockSpec((None, t, None, dv), lambda i, j: (i, 0, j, 0))]
    args = [a, b]
    if w is not None:
        in_specs.append(pl.BlockSpec((None, None, t), lambda i, j: (i, j, 0)))
        args.append(w)
    for x in factors:
        in_specs.append(pl.BlockSpec((None, None, x.shape[-1]), lambda i, j: (i, j, 0)))
        args.append(x)
    return pl.pallas_call(
        functools.partial(_state_kernel, cfg=cfg, weighted=w is not None, reverse=reverse),
        grid=(batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, n, f, dv), lambda i, j: (i, j, 0, 0, 0)),
                   pl.BlockSpec((None, None, n, f), lambda i, j: (i, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n, f, dv), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, n, f), jnp.float32)],
        compiler_params=_params(cfg, f, dv),
        interpret=cfg.interpret,
        name="linear_attention_states_rev" if reverse else "linear_attention_states",
    )(*args)


def _chunk_specs(cfg: _Config, *dims):
    """BlockSpecs of one chunk of [B, T, H, d] arrays, grid (chunk, batch, head)."""
    c = cfg.chunk
    return [pl.BlockSpec((None, c, None, d), lambda ci, b, h: (b, ci, h, 0)) for d in dims]


def _state_specs(cfg: _Config, f, dv):
    if cfg.causal:
        idx_s = lambda ci, b, h: (b, h, ci, 0, 0)  # noqa: E731
        idx_z = lambda ci, b, h: (b, h, ci, 0)  # noqa: E731
    else:
        idx_s = lambda ci, b, h: (b, h, 0, 0, 0)  # noqa: E731
        idx_z = lambda ci, b, h: (b, h, 0, 0)  # noqa: E731
    return [pl.BlockSpec((None, None, None, f, dv), idx_s),
            pl.BlockSpec((None, None, None, f), idx_z)]


def _row_spec(cfg: _Config):
    return pl.BlockSpec((None, None, cfg.chunk), lambda ci, b, h: (b, h, ci))  # [B, H, T]


def _pair(cfg: _Config, ref_ref):
    """[C, C] weights of key j for query i in one chunk: tril, times exp(r_j - r_i) <= 1 when
    cfg.scaled (r: running max of the key logs, [C])."""
    tril = _tril(cfg.chunk)
    if ref_ref is None:
        return jnp.where(tril, 1.0, 0.0)
    r = ref_ref[...]
    return jnp.where(tril, jnp.exp(jnp.minimum(r[None, :] - r[:, None], 0.0)), 0.0)


# ---------------------------------------------------------------------------- chunk kernels


def _out_kernel(q_ref, k_ref, v_ref, s_ref, z_ref, *refs, cfg: _Config):
    # q_ref, k_ref: [C, F]; v_ref: [C, Dv]; s_ref: [F, Dv]; z_ref: [F] -> num [C, Dv], den [C]
    # scaled: wp_ref [C] (weight of the carried state per query), ref_ref [C] (running max)
    wp_ref, ref_ref, num_ref, den_ref = refs if cfg.scaled else (None, None) + refs
    q = q_ref[...]
    num = plgpu.dot(q, s_ref[...].astype(q.dtype))
    den = jnp.sum(q.astype(jnp.float32) * z_ref[...][None, :], axis=1)
    if wp_ref is not None:
        wp = wp_ref[...]
        num, den = num * wp[:, None], den * wp
    if cfg.causal:
        a = plgpu.dot(q, k_ref[...], trans_b=True) * _pair(cfg, ref_ref)  # [C, C]
        num = num + plgpu.dot(a.astype(v_ref.dtype), v_ref[...])
        den = den + jnp.sum(a, axis=1)
    num_ref[...] = num
    den_ref[...] = den


def _dq_kernel(dn_ref, dd_ref, k_ref, v_ref, s_ref, z_ref, *refs, cfg: _Config):
    # dphi(q)_i = S_i dnum_i + dden_i z_i (+ intra-chunk sum_{j<=i} (dnum_i.v_j + dden_i) phi(k)_j)
    wp_ref, ref_ref, dq_ref = refs if cfg.scaled else (None, None) + refs
    dn, dd = dn_ref[...], dd_ref[...]  # [C, Dv], [C]
    dq = plgpu.dot(dn, s_ref[...].astype(dn.dtype), trans_b=True)  # [C, F]
    dq = dq + dd[:, None] * z_ref[...][None, :]
    if wp_ref is not None:
        dq = dq * wp_ref[...][:, None]
    if cfg.causal:
        m = (plgpu.dot(dn, v_ref[...], trans_b=True) + dd[:, None]) * _pair(cfg, ref_ref)
        dq = dq + plgpu.dot(m.astype(k_ref.dtype), k_ref[...])
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, dn_ref, dd_ref, r_ref, rz_ref, *refs, cfg: _Config):
    # R_c, r_c: sums over the queries after chunk c (all queries when non-causal) of
    # phi(q) dnum^T and dden phi(q). dphi(k)_j = R v_j + r (+ intra), dv_j = R^T phi(k)_j (+ intra).
    # scaled: g_ref [C] (weight of key j in its chunk's state), ref_ref [C] (running max).
    g_ref, ref_ref, dk_ref, dv_ref = refs if cfg.scaled else (None, None) + refs
    k, v = k_ref[...], v_ref[...]
    r = r_ref[...].astype(k.dtype)  # [F, Dv]
    dk = plgpu.dot(v, r, trans_b=True) + rz_ref[...][None, :]  # [C, F]
    dv = plgpu.dot(k, r)  # [C, Dv]
    if g_ref is not None:
        g = g_ref[...][:, None]
        dk, dv = dk * g, dv * g
    if cfg.causal:
        q, dn, dd = q_ref[...], dn_ref[...], dd_ref[...]
        pair = _pair(cfg, ref_ref)
        m = (plgpu.dot(dn, v, trans_b=True) + dd[:, None]) * pair  # [Ci, Cj]
        dk_in = plgpu.dot(m.astype(q.dtype), q, trans_a=True)
        a = plgpu.dot(q, k, trans_b=True) * pair  # [Ci, Cj]
        dv_in = plgpu.dot(a.astype(dn.dtype), dn, trans_a=True)
        dk, dv = dk + dk_in, dv + dv_in
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _grid(cfg, q):
    return (q.shape[1] // cfg.chunk, q.shape[0], q.shape[2])


def _forward(cfg: _Config, q, k, v, factors):
    batch, t, heads, f = q.shape
    dv = v.shape[-1]
    s, z = _forward_states(cfg, k, v, factors)
    rows = (factors["wp"], factors["ref"]) if cfg.scaled else ()
    return pl.pallas_call(
        functools.partial(_out_kernel, cfg=cfg),
        grid=_grid(cfg, q),
        in_specs=_chunk_specs(cfg, f, f, dv) + _state_specs(cfg, f, dv)
        + [_row_spec(cfg)] * len(rows),
        out_specs=[_chunk_specs(cfg, dv)[0], _row_spec(cfg)],
        out_shape=[jax.ShapeDtypeStruct((batch, t, heads, dv), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, t), jnp.float32)],
        compiler_params=_params(cfg, f, dv),
        interpret=cfg.interpret,
        name="linear_attention_out",
    )(q, k, v, s, z, *rows)


def _forward_states(cfg: _Config, k, v, factors):
    """Chunk states of the keys; scaled: key j weighted by g_j into its chunk's state."""
    if not cfg.scaled:
        return _states(cfg, k, v)
    g = jnp.swapaxes(factors["g"], 1, 2)[..., None].astype(k.dtype)  # [B, T, H, 1]
    return _states(cfg, k * g, v, None, (factors["decay"],))


def _backward(cfg: _Config, q, k, v, factors, dnum, dden):
    f, dv = q.shape[-1], v.shape[-1]
    s, z = _forward_states(cfg, k, v, factors)  # recomputed: the O(n / C) states are not kept
    rows = (factors["wp"], factors["ref"]) if cfg.scaled else ()
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=_grid(cfg, q),
        in_specs=_chunk_specs(cfg, dv) + [_row_spec(cfg)] + _chunk_specs(cfg, f, dv)
        + _state_specs(cfg, f, dv) + [_row_spec(cfg)] * len(rows),
        out_specs=_chunk_specs(cfg, f)[0],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg, f, dv),
        interpret=cfg.interpret,
        name="linear_attention_dq",
    )(dnum, dden, k, v, s, z, *rows)
    if cfg.scaled:  # the queries' state weights wp enter the reverse sums
        wp = factors["wp"]                                       # [B, H, T]
        r, rz = _states(cfg, q, dnum * jnp.swapaxes(wp, 1, 2)[..., None].astype(dnum.dtype),
                        dden * wp, (factors["decay"],), reverse=True)
        rows = (factors["g"], factors["ref"])
    else:
        r, rz = _states(cfg, q, dnum, dden, reverse=True)
        rows = ()
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=_grid(cfg, q),
        in_specs=_chunk_specs(cfg, f, f, dv, dv) + [_row_spec(cfg)] + _state_specs(cfg, f, dv)
        + [_row_spec(cfg)] * len(rows),
        out_specs=_chunk_specs(cfg, f, dv),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg, f, dv),
        interpret=cfg.interpret,
        name="linear_attention_dkv",
    )(q, k, v, dnum, dden, r, rz, *rows)
    return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sums(cfg: _Config, q, k, v, factors):
    return tuple(_forward(cfg, q, k, v, factors))


def _sums_fwd(cfg, q, k, v, factors):
    return tuple(_forward(cfg, q, k, v, factors)), (q, k, v, factors)


def _sums_bwd(cfg, res, cotangents):
    q, k, v, factors = res
    dnum, dden = cotangents
    dq, dk, dv = _backward(cfg, q, k, v, factors, dnum.astype(v.dtype),
                           dden.astype(jnp.float32))
    return dq, dk, dv, jax.tree.map(jnp.zeros_like, factors)


_sums.defvjp(_sums_fwd, _sums_bwd)


def _running_max_factors(ref, chunk: int):
    """Weights of the causal k_log path from the running max r [B, H, T] of the key logs
    (constants; every exponent <= 0). e_c = r at the end of chunk c.
    decay [B, H, NC] = e^{e_{c-1} - e_c} (both state passes); wp [B, H, T] = e^{e_{c-1} - r_i}
    (query i's weight on the carried state); g [B, H, T] = e^{r_j - e_c} (key j into its
    chunk's state); ref = r (pair weights e^{r_j - r_i} inside a chunk)."""
    ref = jax.lax.stop_gradient(ref)
    b, h, t = ref.shape
    rc = ref.reshape(b, h, t // chunk, chunk)
    end = rc[..., -1]                                                # [B, H, NC]
    prev = jnp.concatenate([jnp.full_like(end[..., :1], NEG_INF), end[..., :-1]], axis=-1)
    return {"decay": jnp.exp(prev - end),
            "wp": jnp.exp(prev[..., None] - rc).reshape(b, h, t),
            "g": jnp.exp(rc - end[..., None]).reshape(b, h, t),
            "ref": ref}


def kernel_attention(qf, kf, v, kv_mask=None, *, causal: bool, k_log: bool = False,
                     k_eps: float = 0.0, block_t: int | None = None, interpret: bool = False,
                     num_warps=None, num_stages=None):
    """Linear attention given feature maps, as attention/_linearized.kernel_attention, in Pallas.

    qf: [B, Tq, H, F] positive query features; kf: [B, Tk, H, F] positive key features, or
    their logarithms with k_log=True (then exp(log - ref_i) + k_eps, ref_i the max over the
    real keys query i sees); v: [B, Tk, H, Dv]; kv_mask: bool [B, Tk].
    -> float32 [B, Tq, H, Dv]; zeros for a query with no visible key. block_t: chunk rows.
    """
    batch, q_len, heads, f = qf.shape
    kv_len, dv = kf.shape[1], v.shape[-1]
    if causal and q_len != kv_len:
        raise ValueError(f"linear attention kernel: causal needs q_len == kv_len; got "
                         f"{q_len}, {kv_len}")
    chunk = pick_block(block_t, max(q_len, kv_len), "linear attention kernel", "block_t",
                       interpret)
    t = -(-max(q_len, kv_len) // chunk) * chunk
    mask = jnp.ones((batch, kv_len), bool) if kv_mask is None else kv_mask.astype(bool)
    mask = _pad_axis(mask, 1, t)[:, :, None, None]  # [B, T, 1, 1]; padding is not a key
    kf = _pad_axis(kf.astype(jnp.float32), 1, t)
    scaled = bool(k_log and causal)
    factors = {}
    if k_log:
        kf = jnp.where(mask, kf, NEG_INF)
        if causal:  # running max over real keys up to each position, [B, H, T]
            ref = jax.lax.cummax(jnp.swapaxes(jnp.max(kf, axis=3), 1, 2), axis=2)
            factors = _running_max_factors(ref, chunk)
            kf = jnp.exp(kf - jnp.swapaxes(factors["ref"], 1, 2)[..., None])
        else:
            kf = jnp.exp(kf - jax.lax.stop_gradient(jnp.max(kf, axis=(1, 3), keepdims=True)))
            kf = kf + k_eps
    kf = jnp.where(mask, kf, 0.0)
    dtype = v.dtype  # features enter the kernels' dots in the input precision
    fp, dvp = _pow2_at_least(f), _pow2_at_least(dv)
    pq = _pad_axis(_pad_axis(qf.astype(dtype), 1, t), 3, fp)
    pk = _pad_axis(kf.astype(dtype), 3, fp)
    pv = _pad_axis(_pad_axis(v, 1, t), 3, dvp)
    cfg = _Config(chunk=chunk, causal=bool(causal), scaled=scaled, interpret=interpret,
                  num_warps=num_warps, num_stages=num_stages)
    num, den = _sums(cfg, pq, pk, pv, factors)  # [B, T, H, Dv'] f32, [B, H, T] f32
    num = num[:, :q_len, :, :dv]
    den = jnp.swapaxes(den, 1, 2)[:, :q_len]
    if scaled and k_eps:  # k_eps * phi(q_i) . 1 times the prefix sums of v and of the count
        real = mask[:, :q_len, :, 0]                                 # [B, T, 1]
        qsum = k_eps * jnp.sum(qf.astype(jnp.float32), axis=-1)      # [B, T, H]
        num = num + qsum[..., None] * jnp.cumsum(
            jnp.where(real[..., None], v.astype(jnp.float32), 0.0), axis=1)
        den = den + qsum * jnp.cumsum(real.astype(jnp.float32), axis=1)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


# ------------------------------------------------------------------ the registered variants


def _prepare(name, q, k, v, kv_mask, causal, interpret):
    check_qkv(name, q, k, v, kv_mask)
    check_causal(name, causal, True, q.shape[1], k.shape[1])
    return resolve_interpret(interpret, name)


@register_pallas("linear")
def linear_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, block_t=None,
                     interpret=None):
    """elu(x) + 1 features; chunk_size is the XLA scan's chunk, the kernel's is block_t."""
    from attention.linear import elu_feature

    del chunk_size
    interpret = _prepare("linear", q, k, v, kv_mask, causal, interpret)
    out = kernel_attention(elu_feature(q), elu_feature(k), v, kv_mask, causal=causal,
                           block_t=block_t, interpret=interpret)
    return out.astype(v.dtype)


@register_pallas("performer")
def performer_attention(q, k, v, *, kv_mask=None, causal=False, num_features, feature_map,
                        chunk_size, redraw, redraw_interval, projection=None, redraw_key=None,
                        redraw_count=None, block_t=None, interpret=None):
    """FAVOR+ / relu / exp features from attention/performer.py, chunked in Pallas."""
    from attention import performer as xla

    del chunk_size, redraw, redraw_interval, redraw_key, redraw_count  # XLA's, update_buffers's
    interpret = _prepare("performer", q, k, v, kv_mask, causal, interpret)
    d = q.shape[-1]
    w = xla.feature_weights(projection, num_features, feature_map, d)
    run = functools.partial(kernel_attention, v=v, kv_mask=kv_mask, causal=causal,
                            block_t=block_t, interpret=interpret)
    if feature_map == "relu":
        proj = lambda x: jnp.einsum("bthd,md->bthm", x.astype(jnp.float32) * d ** -0.25, w)  # noqa
        out = run(jax.nn.relu(proj(q)) + 1e-3, jax.nn.relu(proj(k)) + 1e-3)
    else:
        out = run(xla.query_features(q, w), xla._log_features(k, w), k_log=True,
                  k_eps=xla.NUMERICAL_STABILIZER)
    return out.astype(v.dtype)
