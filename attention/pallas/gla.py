"""Gated Linear Attention (attention/gla.py) in Pallas: the chunked linear-attention kernel of
attention/pallas/linear.py with GLA's per-channel decay in place of its scalar one.

Per batch-head, a state pass walks the chunks in order and writes the state before each chunk,
S_{c+1} = diag(exp G_c) S_c + (K_c * exp(G_c - G))^T V_c (G: the within-chunk cumulative
log-decays, G_c their chunk total; every exponent <= 0). A chunk-parallel pass then gives
O_c = (Q_c * exp G) S_c + the intra-chunk term sum_{j<=i} sum_d q_id k_jd exp(G_id - G_jd) v_j,
formed key row by key row (a loop over the chunk's c keys, each a [c, Dk] product), so no
exponent is positive and no [c, c, Dk] tensor is held.

Forward only in Pallas: the backward pass recomputes through the XLA chunkwise form
(attention.gla.gla_chunkwise, jax.vjp) inside a custom_vjp: the same function, so the same
gradients, at the XLA form's cost. Gates, masking, the bidirectional form and the output norm
are the XLA variant's own (attention.gla.gated_attention); only the causal scan runs here.
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
    xla_chunk: int = 16      # the backward's chunk (the XLA form's chunk_size)
    num_warps: int | None = None
    num_stages: int | None = None


def _params(cfg: _Config, dk: int, dv: int):
    if cfg.interpret:
        return None
    num_warps = cfg.num_warps or (8 if dk * dv >= 128 * 64 else 4)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages or 2)


def _state_kernel(kd_ref, v_ref, decay_ref, s_ref, *, cfg: _Config):
    """kd_ref [T, Dk] (keys times exp(G_c - G)); v_ref [T, Dv]; decay_ref [NC, Dk] (exp G_c)
    -> s_ref [NC, Dk, Dv]: the state before each chunk."""
    c = cfg.chunk
    num_chunks = kd_ref.shape[0] // c

    def body(ci, s):
        s_ref[ci] = s
        start = pl.multiple_of(ci * c, c)
        ds = plgpu.dot(kd_ref[pl.ds(start, c), :], v_ref[pl.ds(start, c), :], trans_a=True)
        return s * decay_ref[ci][:, None] + ds

    jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(s_ref.shape[1:], jnp.float32))


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


def _forward(cfg: _Config, q, k, v, g):
    """q, k, g: [B, T, H, Dk]; v: [B, T, H, Dv], T a multiple of the chunk; float32."""
    batch, t, heads, dk = k.shape
    dv = v.shape[-1]
    c, n = cfg.chunk, t // cfg.chunk
    cum = jnp.cumsum(g.reshape(batch, n, c, heads, dk), axis=2)       # within-chunk G
    end = cum[:, :, -1]                                               # [B, NC, H, Dk]
    kd = (k.reshape(cum.shape) * jnp.exp(end[:, :, None] - cum)).reshape(k.shape)
    decay = jnp.exp(jnp.transpose(end, (0, 2, 1, 3)))                 # [B, H, NC, Dk]
    full = lambda d: pl.BlockSpec((None, t, None, d), lambda i, j: (i, 0, j, 0))  # noqa: E731
    states = pl.pallas_call(
        functools.partial(_state_kernel, cfg=cfg),
        grid=(batch, heads),
        in_specs=[full(dk), full(dv), pl.BlockSpec((None, None, n, dk),
                                                   lambda i, j: (i, j, 0, 0))],
        out_specs=pl.BlockSpec((None, None, n, dk, dv), lambda i, j: (i, j, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, n, dk, dv), jnp.float32),
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="gla_states",
    )(kd, v, decay)
    chunk = lambda d: pl.BlockSpec((None, c, None, d), lambda ci, b, h: (b, ci, h, 0))  # noqa
    return pl.pallas_call(
        functools.partial(_out_kernel, cfg=cfg),
        grid=(n, batch, heads),
        in_specs=[chunk(dk), chunk(dk), chunk(dv), chunk(dk),
                  pl.BlockSpec((None, None, None, dk, dv), lambda ci, b, h: (b, h, ci, 0, 0))],
        out_specs=chunk(dv),
        out_shape=jax.ShapeDtypeStruct((batch, t, heads, dv), jnp.float32),
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="gla_out",
    )(q, k, v, cum.reshape(k.shape), states)


def _xla(cfg: _Config, q, k, v, g):
    heads_first = [jnp.swapaxes(x, 1, 2) for x in (q, k, v, g)]
    return jnp.swapaxes(xla.gla_chunkwise(*heads_first, cfg.xla_chunk), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gla(cfg: _Config, q, k, v, g):
    return _forward(cfg, q, k, v, g)


def _gla_fwd(cfg, q, k, v, g):
    return _forward(cfg, q, k, v, g), (q, k, v, g)


def _gla_bwd(cfg, res, ct):
    _, vjp = jax.vjp(functools.partial(_xla, cfg), *res)
    return vjp(ct)


_gla.defvjp(_gla_fwd, _gla_bwd)


def gla_scan(q, k, v, g, *, block_t=None, interpret=False, xla_chunk=16, num_warps=None,
             num_stages=None):
    """Causal GLA as attention.gla.gla_chunkwise, in Pallas. Heads-first q, k, g
    [B, H, T, Dk], v [B, H, T, Dv] (g: log decays, 0 and k = 0 at padded positions).
    -> float32 [B, H, T, Dv]. xla_chunk: the chunk of the backward's XLA form."""
    t, dk, dv = k.shape[2], k.shape[-1], v.shape[-1]
    chunk = pick_block(block_t, t, "gla kernel", "block_t", interpret)
    tp, dkp, dvp = -(-t // chunk) * chunk, _pow2_at_least(dk), _pow2_at_least(dv)
    # Zero padding: padded positions have k = v = 0 and g = 0 (they neither write nor decay);
    # padded channels add nothing to q . k and carry no value.
    pad = lambda x, d: _pad_axis(_pad_axis(jnp.swapaxes(x, 1, 2).astype(jnp.float32),  # noqa
                                           1, tp), 3, d)
    cfg = _Config(chunk=chunk, interpret=interpret, xla_chunk=xla_chunk, num_warps=num_warps,
                  num_stages=num_stages)
    out = _gla(cfg, pad(q, dkp), pad(k, dkp), pad(v, dvp), pad(g, dkp))
    return jnp.swapaxes(out[:, :t, :, :dv], 1, 2)


@register_pallas("gla")
def gla_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, gate_rank,
                  gate_temperature, output_norm, gate_down=None, gate_up=None, gate_bias=None,
                  block_t=None, interpret=None):
    """The XLA variant's gates, masks, directions and norm around the Pallas scan; chunk_size
    is the XLA form's chunk (and the backward's), the kernel's is block_t."""
    interpret = resolve_interpret(interpret, "gla")
    run = functools.partial(gla_scan, block_t=block_t, interpret=interpret,
                            xla_chunk=chunk_size)
    return xla.gated_attention("gla", q, k, v, kv_mask, causal, gate_rank=gate_rank,
                               gate_temperature=gate_temperature, output_norm=output_norm,
                               gate_down=gate_down, gate_up=gate_up, gate_bias=gate_bias,
                               run=run)
