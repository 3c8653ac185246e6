"""The delta rule (attention/delta.py: deltanet, gated_deltanet) in Pallas: the chunked state
kernels of attention/pallas/gla.py with the WY / UT form of the delta rule per chunk.

Per chunk of C positions (G: within-chunk cumulative log-decays, a scalar per position; 0 for
deltanet; Gamma_ij = exp(G_i - G_j) <= 1 for j <= i):
  prep (chunk-parallel): T = (I + strict_tril(diag(beta) (Gamma * K K^T)))^-1 by forward
      substitution inside the kernel (C rows, each a [C, C] masked update:
      X_i = L_i + sum_{k<i} L_ik X_k for X = T - I, L = -strict_tril(...)), then
      U = T (beta V), W = T (beta e^G K);
  states (one program per batch-head, walking its chunks in order): new_c = U_c - W_c S_c,
      S_{c+1} = e^{G_c} S_c + (e^{G_c - G} K_c)^T new_c; writes S_c and new_c;
  output (chunk-parallel): O_c = (e^G Q_c) S_c + tril(Gamma * Q_c K_c^T) new_c.
Every exponent is <= 0. No program carries anything across grid steps.

Forward only in Pallas: the backward pass recomputes through the XLA chunkwise form
(attention.delta.delta_chunkwise, jax.vjp, at the variant's chunk_size) inside a custom_vjp: the
same function, so the same gradients, at the XLA form's cost. Gates, L2 normalisation,
masking, the bidirectional form and the output norm are the XLA variant's own
(attention.delta._attend); only the causal scan runs here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import delta as xla
from attention import register_pallas
from attention.pallas.block_sparse import _pad_axis, _pow2_at_least, pick_block, resolve_interpret


@dataclasses.dataclass(frozen=True)
class _Config:
    chunk: int
    interpret: bool
    xla_chunk: int = 64      # the backward's chunk (the XLA form's chunk_size)
    num_warps: int | None = None
    num_stages: int | None = None


def _params(cfg: _Config, dk: int, dv: int):
    if cfg.interpret:
        return None
    num_warps = cfg.num_warps or (8 if dk * dv >= 128 * 64 else 4)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages or 2)


def _prep_kernel(k_ref, v_ref, beta_ref, g_ref, u_ref, w_ref, *, cfg: _Config):
    """One chunk: k_ref [C, Dk], v_ref [C, Dv], beta_ref, g_ref [C] (g: cumulative log-decays
    within the chunk) -> u_ref [C, Dv] = T (beta V), w_ref [C, Dk] = T (beta e^G K)."""
    c = cfg.chunk
    k, beta, g = k_ref[...], beta_ref[...], g_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    gamma = jnp.exp(jnp.minimum(g[:, None] - g[None, :], 0.0))
    low = jnp.where(rows > cols, -(beta[:, None] * gamma) * plgpu.dot(k, k, trans_b=True), 0.0)

    def body(i, x):  # row i of X = T - I from the rows above it
        li = jnp.sum(jnp.where(rows == i, low, 0.0), axis=0)                 # L_i, [C]
        xi = li + jnp.sum(li[:, None] * x, axis=0)
        return jnp.where(rows == i, xi[None, :], x)

    x = jax.lax.fori_loop(1, c, body, low)
    t = x + jnp.where(rows == cols, 1.0, 0.0).astype(x.dtype)
    u_ref[...] = plgpu.dot(t, beta[:, None] * v_ref[...])
    w_ref[...] = plgpu.dot(t, (beta * jnp.exp(g))[:, None] * k)


def _state_kernel(u_ref, w_ref, kd_ref, decay_ref, s_ref, new_ref, *, cfg: _Config):
    """One batch-head: u_ref [T, Dv], w_ref, kd_ref [T, Dk] (keys times e^{G_c - G}), decay_ref
    [NC] (e^{G_c}) -> s_ref [NC, Dk, Dv] (state before each chunk), new_ref [T, Dv]
    (U - W S per chunk)."""
    c = cfg.chunk
    num_chunks = u_ref.shape[0] // c

    def body(ci, s):
        s_ref[ci] = s
        start = pl.multiple_of(ci * c, c)
        new = u_ref[pl.ds(start, c), :] - plgpu.dot(w_ref[pl.ds(start, c), :], s)
        new_ref[pl.ds(start, c), :] = new
        return s * decay_ref[ci] + plgpu.dot(kd_ref[pl.ds(start, c), :], new, trans_a=True)

    jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(s_ref.shape[1:], s_ref.dtype))


def _out_kernel(q_ref, k_ref, g_ref, new_ref, s_ref, o_ref, *, cfg: _Config):
    """One chunk: O = (e^G Q) S + tril(Gamma * Q K^T) new."""
    c = cfg.chunk
    q, g = q_ref[...], g_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    gamma = jnp.where(rows >= cols, jnp.exp(jnp.minimum(g[:, None] - g[None, :], 0.0)), 0.0)
    a = gamma * plgpu.dot(q, k_ref[...], trans_b=True)
    o_ref[...] = plgpu.dot(jnp.exp(g)[:, None] * q, s_ref[...]) + plgpu.dot(a, new_ref[...])


def _forward(cfg: _Config, q, k, v, beta, g):
    """q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; beta, g: [B, H, T]; T a multiple of the chunk."""
    batch, t, heads, dk = k.shape
    dv = v.shape[-1]
    c, n = cfg.chunk, t // cfg.chunk
    cum = jnp.cumsum(g.reshape(batch, heads, n, c), axis=-1)          # within-chunk G
    end = cum[..., -1]                                                # [B, H, NC]
    cum_t = cum.reshape(batch, heads, t)
    kd = k * jnp.swapaxes(jnp.exp(jnp.repeat(end, c, axis=-1) - cum_t), 1, 2)[..., None]
    chunk = lambda d: pl.BlockSpec((None, c, None, d), lambda ci, b, h: (b, ci, h, 0))  # noqa
    row = pl.BlockSpec((None, None, c), lambda ci, b, h: (b, h, ci))
    u, w = pl.pallas_call(
        functools.partial(_prep_kernel, cfg=cfg),
        grid=(n, batch, heads),
        in_specs=[chunk(dk), chunk(dv), row, row],
        out_specs=[chunk(dv), chunk(dk)],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)],
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="delta_prep",
    )(k, v, beta, cum_t)
    full = lambda d: pl.BlockSpec((None, t, None, d), lambda i, j: (i, 0, j, 0))  # noqa: E731
    states, new = pl.pallas_call(
        functools.partial(_state_kernel, cfg=cfg),
        grid=(batch, heads),
        in_specs=[full(dv), full(dk), full(dk), pl.BlockSpec((None, None, n),
                                                             lambda i, j: (i, j, 0))],
        out_specs=[pl.BlockSpec((None, None, n, dk, dv), lambda i, j: (i, j, 0, 0, 0)),
                   full(dv)],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n, dk, dv), k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="delta_states",
    )(u, w, kd, jnp.exp(end))
    return pl.pallas_call(
        functools.partial(_out_kernel, cfg=cfg),
        grid=(n, batch, heads),
        in_specs=[chunk(dk), chunk(dk), row, chunk(dv),
                  pl.BlockSpec((None, None, None, dk, dv), lambda ci, b, h: (b, h, ci, 0, 0))],
        out_specs=chunk(dv),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="delta_out",
    )(q, k, cum_t, new, states)


def _xla(cfg: _Config, q, k, v, beta, g):
    heads_first = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
    return jnp.swapaxes(xla.delta_chunkwise(*heads_first, beta, g, cfg.xla_chunk), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(cfg: _Config, q, k, v, beta, g):
    return _forward(cfg, q, k, v, beta, g)


def _delta_fwd(cfg, q, k, v, beta, g):
    return _forward(cfg, q, k, v, beta, g), (q, k, v, beta, g)


def _delta_bwd(cfg, res, ct):
    _, vjp = jax.vjp(functools.partial(_xla, cfg), *res)
    return vjp(ct.astype(res[0].dtype))


_delta.defvjp(_delta_fwd, _delta_bwd)


def delta_scan(q, k, v, beta, g, *, block_t=None, interpret=False, xla_chunk=64,
               num_warps=None, num_stages=None):
    """Causal (gated) delta rule as attention.delta.delta_chunkwise, in Pallas. Heads-first q, k
    [B, H, T, Dk], v [B, H, T, Dv], beta, g [B, H, T] (0 at padded positions).
    -> [B, H, T, Dv], float32 (float64 for float64 inputs, interpret mode only)."""
    t, dk, dv = k.shape[2], k.shape[-1], v.shape[-1]
    chunk = pick_block(block_t, t, "delta kernel", "block_t", interpret)
    tp, dkp, dvp = -(-t // chunk) * chunk, _pow2_at_least(dk), _pow2_at_least(dv)
    dtype = jnp.promote_types(jnp.result_type(q, k, v, beta, g), jnp.float32)
    if dtype != jnp.float32 and not interpret:
        raise ValueError(f"delta kernel: float32 and bfloat16 on a GPU; got {dtype}")
    # Zero padding: padded positions have beta = 0 and g = 0 (no write, no decay), k = v = 0;
    # padded channels add nothing to any product.
    pad = lambda x, d: _pad_axis(_pad_axis(jnp.swapaxes(x, 1, 2).astype(dtype),  # noqa: E731
                                           1, tp), 3, d)
    rows = lambda x: _pad_axis(x.astype(dtype), 2, tp)  # noqa: E731
    cfg = _Config(chunk=chunk, interpret=interpret, xla_chunk=xla_chunk, num_warps=num_warps,
                  num_stages=num_stages)
    out = _delta(cfg, pad(q, dkp), pad(k, dkp), pad(v, dvp), rows(beta), rows(g))
    return jnp.swapaxes(out[:, :t, :, :dv], 1, 2)


def _run(name, interpret, block_t, chunk_size):
    interpret = resolve_interpret(interpret, name)
    return functools.partial(delta_scan, block_t=block_t, interpret=interpret,
                             xla_chunk=chunk_size)


@register_pallas("deltanet")
def deltanet_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, output_norm,
                       beta_proj=None, beta_bias=None, block_t=None, interpret=None):
    """The XLA variant's gates, masks, directions and norm around the Pallas scan; chunk_size
    is the XLA form's chunk (and the backward's), the kernel's is block_t."""
    return xla._attend("deltanet", q, k, v, kv_mask, causal, chunk_size, output_norm,
                       {"beta_proj": beta_proj, "beta_bias": beta_bias},
                       run=_run("deltanet", interpret, block_t, chunk_size))


@register_pallas("gated_deltanet")
def gated_deltanet_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, output_norm,
                             beta_proj=None, beta_bias=None, decay_proj=None, decay_bias=None,
                             decay_log_rate=None, block_t=None, interpret=None):
    """As deltanet_attention, with the decay gate's params."""
    return xla._attend("gated_deltanet", q, k, v, kv_mask, causal, chunk_size, output_norm,
                       {"beta_proj": beta_proj, "beta_bias": beta_bias,
                        "decay_proj": decay_proj, "decay_bias": decay_bias,
                        "decay_log_rate": decay_log_rate},
                       run=_run("gated_deltanet", interpret, block_t, chunk_size))
