"""Gated Linear Attention (attention/gla.py) in Pallas: the chunked linear-attention kernel of
attention/pallas/linear.py with GLA's per-channel decay in place of its scalar one.

Per batch-head, a state pass walks the chunks in order and writes the state before each chunk,
S_{c+1} = diag(exp G_c) S_c + (K_c * exp(G_c - G))^T V_c (G: the within-chunk cumulative
log-decays, G_c their chunk total; every exponent <= 0). A chunk-parallel pass then gives
O_c = (Q_c * exp G) S_c + the intra-chunk term sum_{j<=i} sum_d q_id k_jd exp(G_id - G_jd) v_j,
formed key row by key row (a loop over the chunk's c keys, each a [c, Dk] product), so no
exponent is positive and no [c, c, Dk] tensor is held.

The backward pass has the same shape (attention.gla.gla_chunkwise_bwd's formulas): a reverse
state pass walks the chunks backwards for R_c, the gradient of the state after chunk c
(R <- diag(exp G_c) R + (Q e^G)^T dO), and a chunk-parallel pass gives dQ, dK, dV from the
forward states S_c (kept from the forward pass: [NC, Dk, Dv] per batch-head, the size of the
keys when the chunk is Dv long), R_c and the intra-chunk sums, again row by row. The
log-decays' gradient: the same kernel gives dL/dG = q dq - k dk per position plus the chunk-end
decay's term at the chunk's last row; dg is its within-chunk reverse cumsum (in XLA).
Each program of every kernel is independent: the state passes walk the chunks inside one
program per batch-head, nothing is carried across grid steps. Gates, masking, the
bidirectional form and the output norm are the XLA variant's own
(attention.gla.gated_attention); only the causal scan runs here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import register_pallas
from attention import gla as xla
from attention.pallas.block_sparse import _pad_axis, _pow2_at_least, pick_block, resolve_interpret


@dataclasses.dataclass(frozen=True)
class _Config:
    chunk: int
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None


def _params(cfg: _Config, dk: int, dv: int):
    if cfg.interpret:
        return None
    num_warps = cfg.num_warps or (8 if dk * dv >= 128 * 64 else 4)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages or 2)


def _state_kernel(a_ref, b_ref, decay_ref, s_ref, *, cfg: _Config, reverse: bool):
    """a_ref [T, Dk]; b_ref [T, Dv]; decay_ref [NC, Dk] -> s_ref [NC, Dk, Dv]: per chunk ci the
    state of X <- diag(decay[ci]) X + a_ci^T b_ci before chunk ci is added, walking the chunks
    forwards (the sum over the earlier chunks) or backwards (over the later ones). One
    program walks one batch-head's chunks; programs share nothing."""
    c = cfg.chunk
    num_chunks = a_ref.shape[0] // c

    def body(t, s):
        ci = num_chunks - 1 - t if reverse else t
        s_ref[ci] = s
        start = pl.multiple_of(ci * c, c)
        ds = plgpu.dot(a_ref[pl.ds(start, c), :], b_ref[pl.ds(start, c), :], trans_a=True)
        return s * decay_ref[ci][:, None] + ds

    jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(s_ref.shape[1:], s_ref.dtype))


def _out_kernel(q_ref, k_ref, v_ref, g_ref, s_ref, o_ref, *, cfg: _Config):
    """One chunk: q_ref, k_ref, g_ref [C, Dk] (g: cumulative log-decays within the chunk);
    v_ref [C, Dv]; s_ref [Dk, Dv] (state before the chunk) -> o_ref [C, Dv]."""
    q, g = q_ref[...], g_ref[...]
    o = plgpu.dot(q * jnp.exp(g), s_ref[...])
    rows = jax.lax.broadcasted_iota(jnp.int32, (cfg.chunk, 1), 0)

    def body(j, o):  # key row j of the chunk, to every query i >= j
        kj, gj, vj = k_ref[pl.ds(j, 1), :], g_ref[pl.ds(j, 1), :], v_ref[pl.ds(j, 1), :]
        a = jnp.sum(q * kj * jnp.exp(jnp.minimum(g - gj, 0.0)), axis=1, keepdims=True)
        return o + jnp.where(rows >= j, a, 0.0) * vj

    o_ref[...] = jax.lax.fori_loop(0, cfg.chunk, body, o)


def _grad_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, s_ref, r_ref, dq_ref, dk_ref, dv_ref,
                 dg_ref, *, cfg: _Config):
    """One chunk's dQ, dK, dV and dL/dG (attention.gla.gla_chunkwise_bwd's formulas): q, k, g
    [C, Dk]; v, do [C, Dv]; s_ref: the state before the chunk, r_ref: the gradient of the state
    after it, [Dk, Dv] each. The intra-chunk sums go row by row: key row t to the queries
    i >= t (dQ), query row t to the keys j <= t (dK, dV); every exponent is <= 0.
    dg_ref [C, Dk]: q dq - k dk, plus at the last row dL/dG_c = sum_j k_j dk_j|state +
    e^{G_c} rowsum(S * R)."""
    q, k, v, g, do = q_ref[...], k_ref[...], v_ref[...], g_ref[...], do_ref[...]
    s, r = s_ref[...], r_ref[...]
    gc = g_ref[pl.ds(cfg.chunk - 1, 1), :]                                 # [1, Dk]
    ed = jnp.exp(gc - g)                                                   # e^{G_c - G}
    dq = jnp.exp(g) * plgpu.dot(do, s, trans_b=True)
    dk = ed * plgpu.dot(v, r, trans_b=True)
    dv = plgpu.dot(k * ed, r)
    rows = jax.lax.broadcasted_iota(jnp.int32, (cfg.chunk, 1), 0)
    dgc = (jnp.sum(k * dk, axis=0, keepdims=True)
           + jnp.exp(gc) * jnp.sum(s * r, axis=1)[None, :])                # [1, Dk]

    def body(t, grads):
        dq, dk, dv = grads
        # key row t: M_it = dO_i . v_t for the queries i >= t
        kt, gt, vt = k_ref[pl.ds(t, 1), :], g_ref[pl.ds(t, 1), :], v_ref[pl.ds(t, 1), :]
        m = jnp.where(rows >= t, jnp.sum(do * vt, axis=1, keepdims=True), 0.0)
        dq = dq + m * kt * jnp.exp(jnp.minimum(g - gt, 0.0))
        # query row t: M_tj = dO_t . v_j and A_tj for the keys j <= t
        qt, dot_ = q_ref[pl.ds(t, 1), :], do_ref[pl.ds(t, 1), :]
        qe = qt * jnp.exp(jnp.minimum(gt - g, 0.0))                         # [C, Dk]
        before = rows <= t
        dk = dk + jnp.where(before, jnp.sum(v * dot_, axis=1, keepdims=True), 0.0) * qe
        dv = dv + jnp.where(before, jnp.sum(k * qe, axis=1, keepdims=True), 0.0) * dot_
        return dq, dk, dv

    dq, dk, dv = jax.lax.fori_loop(0, cfg.chunk, body, (dq, dk, dv))
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv
    dg_ref[...] = q * dq - k * dk + jnp.where(rows == cfg.chunk - 1, dgc, 0.0)


def _states(cfg: _Config, a, b, decay, *, reverse: bool):
    """a: [B, T, H, Dk]; b: [B, T, H, Dv]; decay: [B, H, NC, Dk] -> [B, H, NC, Dk, Dv]."""
    batch, t, heads, dk = a.shape
    dv = b.shape[-1]
    n = t // cfg.chunk
    full = lambda d: pl.BlockSpec((None, t, None, d), lambda i, j: (i, 0, j, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_state_kernel, cfg=cfg, reverse=reverse),
        grid=(batch, heads),
        in_specs=[full(dk), full(dv), pl.BlockSpec((None, None, n, dk),
                                                   lambda i, j: (i, j, 0, 0))],
        out_specs=pl.BlockSpec((None, None, n, dk, dv), lambda i, j: (i, j, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, n, dk, dv), a.dtype),
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="gla_states_rev" if reverse else "gla_states",
    )(a, b, decay)


def _chunk_spec(cfg: _Config, d: int):
    """One chunk of a [B, T, H, d] array, grid (chunk, batch, head)."""
    return pl.BlockSpec((None, cfg.chunk, None, d), lambda ci, b, h: (b, ci, h, 0))


def _state_spec(dk: int, dv: int):
    return pl.BlockSpec((None, None, None, dk, dv), lambda ci, b, h: (b, h, ci, 0, 0))


def _decays(cfg: _Config, g):
    """g [B, T, H, Dk] -> (within-chunk cumulative G [B, T, H, Dk], chunk totals G_c
    [B, NC, H, Dk])."""
    batch, t, heads, dk = g.shape
    cum = jnp.cumsum(g.reshape(batch, t // cfg.chunk, cfg.chunk, heads, dk), axis=2)
    return cum.reshape(g.shape), cum[:, :, -1]


def _forward(cfg: _Config, q, k, v, g):
    """q, k, g: [B, T, H, Dk]; v: [B, T, H, Dv], T a multiple of the chunk.
    -> (out [B, T, H, Dv], residuals for _backward)."""
    batch, t, heads, dk = k.shape
    dv = v.shape[-1]
    cum, end = _decays(cfg, g)
    decay = jnp.exp(jnp.transpose(end, (0, 2, 1, 3)))                 # [B, H, NC, Dk]
    kd = k * jnp.exp(jnp.repeat(end, cfg.chunk, axis=1) - cum)     # K e^{G_c - G}, <= |K|
    states = _states(cfg, kd, v, decay, reverse=False)
    out = pl.pallas_call(
        functools.partial(_out_kernel, cfg=cfg),
        grid=(t // cfg.chunk, batch, heads),
        in_specs=[_chunk_spec(cfg, dk), _chunk_spec(cfg, dk), _chunk_spec(cfg, dv),
                  _chunk_spec(cfg, dk), _state_spec(dk, dv)],
        out_specs=_chunk_spec(cfg, dv),
        out_shape=jax.ShapeDtypeStruct((batch, t, heads, dv), q.dtype),
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="gla_out",
    )(q, k, v, cum, states)
    return out, (q, k, v, cum, decay, states)


def _backward(cfg: _Config, res, do):
    """-> (dq, dk, dv, dg) of the padded [B, T, H, .] inputs; dg: the within-chunk reverse
    cumsum of the kernel's dL/dG (attention.gla.gla_chunkwise_bwd)."""
    q, k, v, cum, decay, states = res
    batch, t, heads, dk = k.shape
    dv = v.shape[-1]
    after = _states(cfg, q * jnp.exp(cum), do, decay, reverse=True)
    dq, dk_, dv_, dcum = pl.pallas_call(
        functools.partial(_grad_kernel, cfg=cfg),
        grid=(t // cfg.chunk, batch, heads),
        in_specs=[_chunk_spec(cfg, dk), _chunk_spec(cfg, dk), _chunk_spec(cfg, dv),
                  _chunk_spec(cfg, dk), _chunk_spec(cfg, dv), _state_spec(dk, dv),
                  _state_spec(dk, dv)],
        out_specs=[_chunk_spec(cfg, dk), _chunk_spec(cfg, dk), _chunk_spec(cfg, dv),
                   _chunk_spec(cfg, dk)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)],
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="gla_grad",
    )(q, k, v, cum, do, states, after)
    chunks = (batch, t // cfg.chunk, cfg.chunk, heads, dk)
    dg = jax.lax.cumsum(dcum.reshape(chunks), axis=2, reverse=True).reshape(k.shape)
    return dq, dk_, dv_, dg


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gla(cfg: _Config, q, k, v, g):
    return _forward(cfg, q, k, v, g)[0]


def _gla_fwd(cfg, q, k, v, g):
    return _forward(cfg, q, k, v, g)


def _gla_bwd(cfg, res, ct):
    return _backward(cfg, res, ct.astype(res[0].dtype))


_gla.defvjp(_gla_fwd, _gla_bwd)


def gla_scan(q, k, v, g, *, block_t=None, interpret=False, num_warps=None, num_stages=None):
    """Causal GLA as attention.gla.gla_chunkwise, in Pallas. Heads-first q, k, g
    [B, H, T, Dk], v [B, H, T, Dv] (g: log decays, 0 and k = 0 at padded positions).
    -> [B, H, T, Dv], float32 (float64 for float64 inputs, interpret mode only)."""
    t, dk, dv = k.shape[2], k.shape[-1], v.shape[-1]
    chunk = pick_block(block_t, t, "gla kernel", "block_t", interpret)
    tp, dkp, dvp = -(-t // chunk) * chunk, _pow2_at_least(dk), _pow2_at_least(dv)
    dtype = jnp.promote_types(jnp.result_type(q, k, v, g), jnp.float32)
    if dtype != jnp.float32 and not interpret:
        raise ValueError(f"gla kernel: float32 and bfloat16 on a GPU; got {dtype}")
    # Zero padding: padded positions have k = v = 0 and g = 0 (they neither write nor decay);
    # padded channels add nothing to q . k and carry no value.
    pad = lambda x, d: _pad_axis(_pad_axis(jnp.swapaxes(x, 1, 2).astype(dtype),  # noqa: E731
                                           1, tp), 3, d)
    cfg = _Config(chunk=chunk, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    out = _gla(cfg, pad(q, dkp), pad(k, dkp), pad(v, dvp), pad(g, dkp))
    return jnp.swapaxes(out[:, :t, :, :dv], 1, 2)


@register_pallas("gla")
def gla_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, gate_rank,
                  gate_temperature, output_norm, gate_down=None, gate_up=None, gate_bias=None,
                  block_t=None, interpret=None):
    """The XLA variant's gates, masks, directions and norm around the Pallas scan; chunk_size
    is the XLA form's chunk, the kernel's is block_t."""
    del chunk_size
    interpret = resolve_interpret(interpret, "gla")
    run = functools.partial(gla_scan, block_t=block_t, interpret=interpret)
    return xla.gated_attention("gla", q, k, v, kv_mask, causal, gate_rank=gate_rank,
                               gate_temperature=gate_temperature, output_norm=output_norm,
                               gate_down=gate_down, gate_up=gate_up, gate_bias=gate_bias,
                               run=run)
