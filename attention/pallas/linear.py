"""Chunked linear attention in Pallas (Katharopoulos et al., 2020, eq. 4-9; chunked as in
flash-linear-attention): num_i = phi(q_i)^T sum_j phi(k_j) v_j^T, den_i = phi(q_i)^T sum_j phi(k_j),
the sums over all j (non-causal) or j <= i (causal).

The sequence is cut into chunks of C rows. A state pass per batch-head walks the chunks in order
and writes the state before each chunk, S_c = sum_{chunks < c} phi(K)^T V and z_c, the sum of
phi(K) rows; a chunk-parallel pass then gives num_c = phi(Q_c) S_c + tril(phi(Q_c) phi(K_c)^T) V_c
(and den_c alike). Non-causal: one total state, no intra-chunk term. The backward pass has the
same two-pass shape (forward states for dphi(Q); reverse-cumulative states of phi(Q)^T dnum for
dphi(K) and dV), wired through jax.custom_vjp. The feature maps (elu+1 of `linear`, FAVOR+ and
friends of `performer`) are the XLA variants' own, applied outside the kernels, so both impls
compute the same function; only the O(n) contractions run in Pallas.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attention.pallas.block_sparse import _pad_axis, _pow2_at_least, pick_block

DEFAULT_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class _Config:
    chunk: int
    causal: bool
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None


def _params(cfg: _Config):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=cfg.num_warps or 4, num_stages=cfg.num_stages or 2)


def _tril(c: int):
    r = jnp.arange(c, dtype=jnp.int32)
    return r[:, None] >= r[None, :]  # [C, C]: row i sees column j <= i


# ------------------------------------------------------------------------------ state passes


def _state_kernel(a_ref, b_ref, *refs, cfg: _Config, weighted: bool, reverse: bool):
    """States over chunks of sum_rows a^T b ([F, Dv]) and sum_rows w a ([F]).

    a_ref: [T, F]; b_ref: [T, Dv]; w_ref: [T] (weighted) else w = 1.
    causal: s_ref [NC, F, Dv], z_ref [NC, F] hold, per chunk, the sum over the chunks strictly
    before it (after it when reverse). non-causal: s_ref [1, F, Dv], z_ref [1, F], the total.
    """
    if weighted:
        w_ref, s_ref, z_ref = refs
    else:
        w_ref = None
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
        s = s + pl.dot(a, b, trans_a=True)
        af = a.astype(jnp.float32)
        if weighted:
            af = af * w_ref[pl.ds(start, c)][:, None]
        z = z + jnp.sum(af, axis=0)
        return s, z

    init = (jnp.zeros(s_ref.shape[1:], jnp.float32), jnp.zeros(z_ref.shape[1:], jnp.float32))
    s, z = jax.lax.fori_loop(0, num_chunks, body, init)
    if not cfg.causal:
        s_ref[0] = s
        z_ref[0] = z


def _states(cfg: _Config, a, b, w=None, *, reverse=False):
    """a: [B, T, H, F]; b: [B, T, H, Dv]; w: [B, H, T] or None -> (S [B, H, NC', F, Dv],
    z [B, H, NC', F]) with NC' = T / chunk (causal) or 1."""
    batch, t, heads, f = a.shape
    dv = b.shape[-1]
    n = t // cfg.chunk if cfg.causal else 1
    in_specs = [pl.BlockSpec((None, t, None, f), lambda i, j: (i, 0, j, 0)),
                pl.BlockSpec((None, t, None, dv), lambda i, j: (i, 0, j, 0))]
    args = [a, b]
    if w is not None:
        in_specs.append(pl.BlockSpec((None, None, t), lambda i, j: (i, j, 0)))
        args.append(w)
    return pl.pallas_call(
        functools.partial(_state_kernel, cfg=cfg, weighted=w is not None, reverse=reverse),
        grid=(batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, n, f, dv), lambda i, j: (i, j, 0, 0, 0)),
                   pl.BlockSpec((None, None, n, f), lambda i, j: (i, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n, f, dv), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, n, f), jnp.float32)],
        compiler_params=_params(cfg),
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


# ---------------------------------------------------------------------------- chunk kernels


def _out_kernel(q_ref, k_ref, v_ref, s_ref, z_ref, num_ref, den_ref, *, cfg: _Config):
    # q_ref, k_ref: [C, F]; v_ref: [C, Dv]; s_ref: [F, Dv]; z_ref: [F]
    q = q_ref[...]
    num = pl.dot(q, s_ref[...].astype(q.dtype))  # [C, Dv]
    den = jnp.sum(q.astype(jnp.float32) * z_ref[...][None, :], axis=1)  # [C]
    if cfg.causal:
        a = jnp.where(_tril(cfg.chunk), pl.dot(q, k_ref[...], trans_b=True), 0.0)  # [C, C]
        num = num + pl.dot(a.astype(v_ref.dtype), v_ref[...])
        den = den + jnp.sum(a, axis=1)
    num_ref[...] = num.astype(num_ref.dtype)
    den_ref[...] = den


def _dq_kernel(dn_ref, dd_ref, k_ref, v_ref, s_ref, z_ref, dq_ref, *, cfg: _Config):
    # dphi(q)_i = S_i dnum_i + dden_i z_i (+ intra-chunk sum_{j<=i} (dnum_i.v_j + dden_i) phi(k)_j)
    dn, dd = dn_ref[...], dd_ref[...]  # [C, Dv], [C]
    dq = pl.dot(dn, s_ref[...].astype(dn.dtype), trans_b=True)  # [C, F]
    dq = dq + dd[:, None] * z_ref[...][None, :]
    if cfg.causal:
        m = pl.dot(dn, v_ref[...], trans_b=True) + dd[:, None]  # [C, C]
        m = jnp.where(_tril(cfg.chunk), m, 0.0)
        dq = dq + pl.dot(m.astype(k_ref.dtype), k_ref[...])
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, dn_ref, dd_ref, r_ref, rz_ref, dk_ref, dv_ref, *,
                cfg: _Config):
    # R_c, r_c: sums over queries after chunk c (all queries when non-causal) of phi(q) dnum^T
    # and dden phi(q). dphi(k)_j = R v_j + r (+ intra), dv_j = R^T phi(k)_j (+ intra).
    k, v = k_ref[...], v_ref[...]
    r = r_ref[...].astype(k.dtype)  # [F, Dv]
    dk = pl.dot(v, r, trans_b=True) + rz_ref[...][None, :]  # [C, F]
    dv = pl.dot(k, r)  # [C, Dv]
    if cfg.causal:
        q, dn, dd = q_ref[...], dn_ref[...], dd_ref[...]
        tril = _tril(cfg.chunk)
        m = jnp.where(tril, pl.dot(dn, v, trans_b=True) + dd[:, None], 0.0)  # [Ci, Cj]
        dk = dk + pl.dot(m.astype(q.dtype), q, trans_a=True)
        a = jnp.where(tril, pl.dot(q, k, trans_b=True), 0.0)  # [Ci, Cj]
        dv = dv + pl.dot(a.astype(dn.dtype), dn, trans_a=True)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _grid(cfg, q):
    return (q.shape[1] // cfg.chunk, q.shape[0], q.shape[2])


def _forward(cfg: _Config, q, k, v):
    batch, t, heads, f = q.shape
    dv = v.shape[-1]
    s, z = _states(cfg, k, v)
    return pl.pallas_call(
        functools.partial(_out_kernel, cfg=cfg),
        grid=_grid(cfg, q),
        in_specs=_chunk_specs(cfg, f, f, dv) + _state_specs(cfg, f, dv),
        out_specs=[_chunk_specs(cfg, dv)[0], _row_spec(cfg)],
        out_shape=[jax.ShapeDtypeStruct((batch, t, heads, dv), v.dtype),
                   jax.ShapeDtypeStruct((batch, heads, t), jnp.float32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="linear_attention_out",
    )(q, k, v, s, z)


def _backward(cfg: _Config, q, k, v, dnum, dden):
    f, dv = q.shape[-1], v.shape[-1]
    s, z = _states(cfg, k, v)  # recomputed: O(n / C) states are not kept across the step
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=_grid(cfg, q),
        in_specs=_chunk_specs(cfg, dv) + [_row_spec(cfg)] + _chunk_specs(cfg, f, dv)
        + _state_specs(cfg, f, dv),
        out_specs=_chunk_specs(cfg, f)[0],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="linear_attention_dq",
    )(dnum, dden, k, v, s, z)
    r, rz = _states(cfg, q, dnum, dden, reverse=True)
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=_grid(cfg, q),
        in_specs=_chunk_specs(cfg, f, f, dv, dv) + [_row_spec(cfg)] + _state_specs(cfg, f, dv),
        out_specs=_chunk_specs(cfg, f, dv),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="linear_attention_dkv",
    )(q, k, v, dnum, dden, r, rz)
    return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(cfg: _Config, q, k, v):
    return tuple(_forward(cfg, q, k, v))


def _linear_fwd(cfg, q, k, v):
    return tuple(_forward(cfg, q, k, v)), (q, k, v)


def _linear_bwd(cfg, res, cotangents):
    q, k, v = res
    dnum, dden = cotangents
    return _backward(cfg, q, k, v, dnum.astype(v.dtype), dden.astype(jnp.float32))


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_attention_sums(phi_q, phi_k, v, *, causal: bool, chunk: int | None = None,
                          interpret: bool = False, num_warps=None, num_stages=None):
    """(num [B, Tq, H, Dv] in v.dtype, den [B, Tq, H] float32) of linear attention.

    num_i = sum_j (phi_q_i . phi_k_j) v_j and den_i = sum_j phi_q_i . phi_k_j over all j, or
    j <= i when causal. phi_q: [B, Tq, H, F]; phi_k: [B, Tk, H, F] (rows of padded keys must be
    zero); v: [B, Tk, H, Dv]. Differentiable in all three.
    """
    batch, q_len, heads, f = phi_q.shape
    kv_len, dv = phi_k.shape[1], v.shape[-1]
    if causal and q_len != kv_len:
        raise ValueError(f"linear attention kernel: causal needs q_len == kv_len; got "
                         f"{q_len}, {kv_len}")
    chunk = pick_block(chunk, max(q_len, kv_len), "linear attention kernel", "chunk",
                       interpret)
    t = -(-max(q_len, kv_len) // chunk) * chunk
    fp, dvp = _pow2_at_least(f), _pow2_at_least(dv)
    cfg = _Config(chunk=chunk, causal=bool(causal), interpret=interpret,
                  num_warps=num_warps, num_stages=num_stages)
    # Zero padding adds nothing: padded keys have phi_k = 0, padded features are 0 on both
    # sides, padded value columns and query rows are sliced off.
    pq = _pad_axis(_pad_axis(phi_q, 1, t), 3, fp)
    pk = _pad_axis(_pad_axis(phi_k, 1, t), 3, fp)
    pv = _pad_axis(_pad_axis(v, 1, t), 3, dvp)
    num, den = _linear(cfg, pq, pk, pv)
    return num[:, :q_len, :, :dv], jnp.swapaxes(den, 1, 2)[:, :q_len]
