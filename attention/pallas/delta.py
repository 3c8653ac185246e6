"""The delta rule (attention/delta.py: deltanet, gated_deltanet) in Pallas: the chunked state
kernels of attention/pallas/gla.py with the WY / UT form of the delta rule per chunk.

Per chunk of C positions (G: within-chunk cumulative log-decays, a scalar per position; 0 for
deltanet; Gamma_ij = exp(G_i - G_j) <= 1 for j <= i):
  prep (chunk-parallel): T = (I + strict_tril(diag(beta) (Gamma * K K^T)))^-1 by forward
      substitution inside the kernel (C rows, each a [C, C] masked update:
      X_i = -L_i - sum_{k<i} L_ik X_k for X = T - I, L the strict_tril(...)), then
      U = T (beta V), W = T (beta e^G K);
  states (one program per batch-head, walking its chunks in order): new_c = U_c - W_c S_c,
      S_{c+1} = e^{G_c} S_c + (e^{G_c - G} K_c)^T new_c; writes S_c and new_c;
  output (chunk-parallel): O_c = (e^G Q_c) S_c + tril(Gamma * Q_c K_c^T) new_c.
Every exponent is <= 0. No program carries anything across grid steps.

The backward pass, walking the chunks backwards with R (the gradient of the state after a
chunk) and dN (the gradient of U - W S): dN = A^T dO + K_d R, R <- e^{G_c} R + (e^G Q)^T dO -
W^T dN (A = tril(Gamma * Q K^T), K_d = K e^{G_c - G}; one program per batch-head); then, chunk
by chunk, T again, dT = dN (beta V)^T - dN S^T (beta e^G K)^T, dL = -T^T dT T^T (strictly
lower), and from them dQ, dK, dV, dbeta and the within-chunk dG (each Gamma_ij = e^{G_i - G_j}
gives dG_i += P_ij, dG_j -= P_ij with P = dGamma * Gamma; G_c also scales the state); dg is the
within-chunk reverse cumsum of dG. Kept from the forward pass: W, N and the chunk states.
Gates, L2 normalisation, masking, the bidirectional form and the output norm are the XLA
variant's own (attention.delta._attend); only the causal scan runs here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import delta as xla
from attention import register_pallas
from attention.pallas.block_sparse import _pad_axis, _pow2_at_least, pick_block, resolve_interpret
from attention.pallas.gla import _Config, _params    # the same launch settings as gla's kernels


def _prep_kernel(k_ref, v_ref, beta_ref, g_ref, u_ref, w_ref, *, cfg: _Config):
    """One chunk: k_ref [C, Dk], v_ref [C, Dv], beta_ref, g_ref [C] (g: cumulative log-decays
    within the chunk) -> u_ref [C, Dv] = T (beta V), w_ref [C, Dk] = T (beta e^G K)."""
    k, beta, g = k_ref[...], beta_ref[...], g_ref[...]
    t = _solve(cfg, k, beta, g)[0]
    u_ref[...] = plgpu.dot(t, beta[:, None] * v_ref[...])
    w_ref[...] = plgpu.dot(t, (beta * jnp.exp(g))[:, None] * k)


def _solve(cfg: _Config, k, beta, g):
    """-> (T = (I + L)^-1, L = strict_tril(diag(beta) (Gamma * K K^T)), Gamma (lower, with
    the diagonal), K K^T), [C, C] each; T by forward substitution: X = T - I has rows
    X_i = -L_i - sum_{k<i} L_ik X_k (row i from the rows above it)."""
    c = cfg.chunk
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    gamma = jnp.where(rows >= cols, jnp.exp(jnp.minimum(g[:, None] - g[None, :], 0.0)), 0.0)
    kk = plgpu.dot(k, k, trans_b=True)
    low = jnp.where(rows > cols, beta[:, None] * gamma * kk, 0.0)

    def body(i, x):
        li = -jnp.sum(jnp.where(rows == i, low, 0.0), axis=0)                # -L_i, [C]
        xi = li + jnp.sum(li[:, None] * x, axis=0)
        return jnp.where(rows == i, xi[None, :], x)

    x = jax.lax.fori_loop(1, c, body, -low)
    return x + jnp.where(rows == cols, 1.0, 0.0).astype(x.dtype), low, gamma, kk


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


def _state_pass(kernel, name: str, cfg: _Config, k, v, in_specs, *args):
    """One program per (batch, head) walking its chunks (no state across grid steps):
    -> (a state per chunk [B, H, n, Dk, Dv], an array shaped like v [B, T, H, Dv])."""
    batch, t, heads, dk = k.shape
    dv, n = v.shape[-1], t // cfg.chunk
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=(batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, n, dk, dv), lambda i, j: (i, j, 0, 0, 0)),
                   pl.BlockSpec((None, t, None, dv), lambda i, j: (i, 0, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n, dk, dv), k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name=name,
    )(*args)


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
    states, new = _state_pass(
        _state_kernel, "delta_states", cfg, k, v,
        [full(dv), full(dk), full(dk), pl.BlockSpec((None, None, n), lambda i, j: (i, j, 0))],
        u, w, kd, jnp.exp(end))
    out = pl.pallas_call(
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
    return out, (q, k, v, beta, cum_t, kd, jnp.exp(end), w, new, states)


def _rev_kernel(q_ref, k_ref, g_ref, kd_ref, w_ref, do_ref, decay_ref, r_ref, dn_ref, *,
                cfg: _Config):
    """One batch-head, its chunks walked backwards carrying R, the gradient of the state after
    the chunk: dN = A^T dO + K_d R (A = tril(Gamma * Q K^T), K_d = K e^{G_c - G}),
    R <- e^{G_c} R + (e^G Q)^T dO - W^T dN. Writes R per chunk [NC, Dk, Dv] and dN [T, Dv]."""
    c = cfg.chunk
    num_chunks = q_ref.shape[0] // c
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def body(t, r):
        ci = num_chunks - 1 - t
        r_ref[ci] = r
        start = pl.multiple_of(ci * c, c)
        q, k, g = q_ref[pl.ds(start, c), :], k_ref[pl.ds(start, c), :], g_ref[pl.ds(start, c)]
        do = do_ref[pl.ds(start, c), :]
        gamma = jnp.where(rows >= cols, jnp.exp(jnp.minimum(g[:, None] - g[None, :], 0.0)), 0.0)
        a = gamma * plgpu.dot(q, k, trans_b=True)
        dn = plgpu.dot(a, do, trans_a=True) + plgpu.dot(kd_ref[pl.ds(start, c), :], r)
        dn_ref[pl.ds(start, c), :] = dn
        return (r * decay_ref[ci] + plgpu.dot(jnp.exp(g)[:, None] * q, do, trans_a=True)
                - plgpu.dot(w_ref[pl.ds(start, c), :], dn, trans_a=True))

    jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(r_ref.shape[1:], r_ref.dtype))


def _grad_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, do_ref, new_ref, dn_ref, s_ref, r_ref,
                 dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref, *, cfg: _Config):
    """One chunk's gradients from S (state before it), R (gradient of the state after it),
    N = U - W S and dN: dQ, dK, dV, dbeta and dG (of the within-chunk cumulative log-decays)."""
    c = cfg.chunk
    q, k, v, beta, g = q_ref[...], k_ref[...], v_ref[...], beta_ref[...], g_ref[...]
    do, new, dn, s, r = do_ref[...], new_ref[...], dn_ref[...], s_ref[...], r_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    t, low, gamma, kk = _solve(cfg, k, beta, g)
    eg = jnp.exp(g)
    gc = g_ref[pl.ds(c - 1, 1)]                                             # [1]
    ed = jnp.exp(gc - g)
    vb, kb = beta[:, None] * v, (beta * eg)[:, None] * k
    dw = -plgpu.dot(dn, s, trans_b=True)                                    # N = U - W S
    dt = plgpu.dot(dn, vb, trans_b=True) + plgpu.dot(dw, kb, trans_b=True)
    dvb = plgpu.dot(t, dn, trans_a=True)
    dkb = plgpu.dot(t, dw, trans_a=True)
    dl = jnp.where(rows > cols, -plgpu.dot(plgpu.dot(t, dt, trans_a=True), t, trans_b=True), 0.0)
    da = jnp.where(rows >= cols, plgpu.dot(do, new, trans_b=True), 0.0)   # A = Gamma * Q K^T
    dkd = plgpu.dot(new, r, trans_b=True)                                   # K_d = K e^{G_c-G}
    dos = plgpu.dot(do, s, trans_b=True)
    dqk = da * gamma
    dkk = beta[:, None] * dl * gamma                                        # L = b Gamma K K^T
    dq_ref[...] = eg[:, None] * dos + plgpu.dot(dqk, k)
    dk_ref[...] = (plgpu.dot(dqk, q, trans_a=True) + plgpu.dot(dkk, k)
                   + plgpu.dot(dkk, k, trans_a=True) + (beta * eg)[:, None] * dkb
                   + ed[:, None] * dkd)
    dv_ref[...] = beta[:, None] * dvb
    kdkb = jnp.sum(k * dkb, axis=1)
    dbeta_ref[...] = (jnp.sum(dl * gamma * kk, axis=1) + jnp.sum(dvb * v, axis=1)
                      + eg * kdkb)
    pa = dqk * plgpu.dot(q, k, trans_b=True)                                # dGamma * Gamma
    pl_ = dl * low
    pd = ed * jnp.sum(k * dkd, axis=1)
    dg = (jnp.sum(pa + pl_, axis=1) - jnp.sum(pa + pl_, axis=0)
          + eg * jnp.sum(q * dos, axis=1) + beta * eg * kdkb - pd)
    last = jnp.sum(pd) + jnp.exp(gc) * jnp.sum(s * r)                       # dG_c
    idx = jax.lax.broadcasted_iota(jnp.int32, (c,), 0)
    dg_ref[...] = dg + jnp.where(idx == c - 1, last, 0.0)


def _backward(cfg: _Config, res, do):
    q, k, v, beta, cum_t, kd, decay, w, new, states = res
    batch, t, heads, dk = k.shape
    dv = v.shape[-1]
    c, n = cfg.chunk, t // cfg.chunk
    full = lambda d: pl.BlockSpec((None, t, None, d), lambda i, j: (i, 0, j, 0))  # noqa: E731
    r, dn = _state_pass(
        _rev_kernel, "delta_states_rev", cfg, k, v,
        [full(dk), full(dk), pl.BlockSpec((None, None, t), lambda i, j: (i, j, 0)),
         full(dk), full(dk), full(dv), pl.BlockSpec((None, None, n), lambda i, j: (i, j, 0))],
        q, k, cum_t, kd, w, do, decay)
    chunk = lambda d: pl.BlockSpec((None, c, None, d), lambda ci, b, h: (b, ci, h, 0))  # noqa
    row = pl.BlockSpec((None, None, c), lambda ci, b, h: (b, h, ci))
    state = pl.BlockSpec((None, None, None, dk, dv), lambda ci, b, h: (b, h, ci, 0, 0))
    dq, dk_, dv_, dbeta, dcum = pl.pallas_call(
        functools.partial(_grad_kernel, cfg=cfg),
        grid=(n, batch, heads),
        in_specs=[chunk(dk), chunk(dk), chunk(dv), row, row, chunk(dv), chunk(dv), chunk(dv),
                  state, state],
        out_specs=[chunk(dk), chunk(dk), chunk(dv), row, row],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(beta.shape,
                                                                                beta.dtype),
                   jax.ShapeDtypeStruct(beta.shape, beta.dtype)],
        compiler_params=_params(cfg, dk, dv),
        interpret=cfg.interpret,
        name="delta_grad",
    )(q, k, v, beta, cum_t, do, new, dn, states, r)
    # G is the within-chunk cumsum of g: dg = the within-chunk reverse cumsum of dG
    dg = jax.lax.cumsum(dcum.reshape(batch, heads, n, c), axis=3, reverse=True)
    return dq, dk_, dv_, dbeta, dg.reshape(beta.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(cfg: _Config, q, k, v, beta, g):
    return _forward(cfg, q, k, v, beta, g)[0]


def _delta_fwd(cfg, q, k, v, beta, g):
    return _forward(cfg, q, k, v, beta, g)


def _delta_bwd(cfg, res, ct):
    return _backward(cfg, res, ct.astype(res[0].dtype))


_delta.defvjp(_delta_fwd, _delta_bwd)


def delta_scan(q, k, v, beta, g, *, block_t=None, interpret=False, num_warps=None,
               num_stages=None):
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
    cfg = _Config(chunk=chunk, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    out = _delta(cfg, pad(q, dkp), pad(k, dkp), pad(v, dvp), rows(beta), rows(g))
    return jnp.swapaxes(out[:, :t, :, :dv], 1, 2)


def _run(name, interpret, block_t):
    interpret = resolve_interpret(interpret, name)
    return functools.partial(delta_scan, block_t=block_t, interpret=interpret)


@register_pallas("deltanet")
def deltanet_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, output_norm,
                       beta_proj=None, beta_bias=None, block_t=None, interpret=None):
    """The XLA variant's gates, masks, directions and norm around the Pallas scan; chunk_size
    is the XLA form's chunk (unused here), the kernel's is block_t."""
    return xla._attend("deltanet", q, k, v, kv_mask, causal, chunk_size, output_norm,
                       {"beta_proj": beta_proj, "beta_bias": beta_bias},
                       run=_run("deltanet", interpret, block_t))


@register_pallas("gated_deltanet")
def gated_deltanet_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, output_norm,
                             beta_proj=None, beta_bias=None, decay_proj=None, decay_bias=None,
                             decay_log_rate=None, block_t=None, interpret=None):
    """As deltanet_attention, with the decay gate's params."""
    return xla._attend("gated_deltanet", q, k, v, kv_mask, causal, chunk_size, output_norm,
                       {"beta_proj": beta_proj, "beta_bias": beta_bias,
                        "decay_proj": decay_proj, "decay_bias": decay_bias,
                        "decay_log_rate": decay_log_rate},
                       run=_run("gated_deltanet", interpret, block_t))
