"""The delta rule as attention: DeltaNet (Schlag et al. 2021; chunkwise training: Yang et al.
2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", sec. 3) and
Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks", sec. 3). With S [Dk, Dv],

    deltanet:        S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    gated_deltanet:  S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t,   q, k L2-normalised per head (no further scale),

i.e. S_t = S_{t-1} - beta_t k_t (k_t^T S_{t-1} - v_t^T): the state's prediction for k_t moves a
fraction beta_t towards v_t. Chunkwise (the WY / UT form): per chunk of c positions with
cumulative log-decays G_i (0 for deltanet) and Gamma_ij = exp(G_i - G_j) (i >= j, <= 1),
    M = I + strict_tril(diag(beta) (Gamma * K K^T)),  U = M^-1 (beta V),  W = M^-1 (beta e^G K)
(M^-1 of the unit lower-triangular M by log2(c) rounds of matmuls), then a lax.scan over
chunks carrying S:
    new = U - W S,   O = (e^G Q) S + tril(Gamma * Q K^T) new,
    S <- e^{G_c} S + (e^{G_c - G} K)^T new.
Every exponent is <= 0, so strong decays cannot overflow.

Gates from the keys (the contract gives q, k, v only; the papers project the layer input x):
beta_t = sigmoid(k_t . w_beta + b_beta) per head (params beta_proj [H, D], beta_bias [H]);
gated_deltanet: log alpha_t = -exp(A_log) softplus(k_t . w_a + dt_bias) per head (the Mamba-2
parameterisation that Gated DeltaNet uses; params decay_proj [H, D], decay_bias [H] (dt bias,
initialised so that softplus is in [0.001, 0.1]), decay_log_rate [H] (A_log, A in [1, 16])).
Both from the raw k, before its L2 normalisation. No short convolution and no output gate (the
papers' layers have both; the contract has no input for them); output_norm: an RMS
normalisation of each head's output (the papers' per-head norm without its affine weight).

Causal is the papers' form. causal=False is a declared bidirectional form (used by the LRA
classification tasks): the forward recurrence plus the same recurrence run from the end (both
include the token itself). Padded keys have beta = 0 and alpha = 1: they neither write nor decay.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attention import Flag, Int, register
from attention.gla import bidirectional, check_lengths, compute_dtype, rms_norm, to_chunks

L2_EPS = 1e-6


def l2_normalize(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def unit_lower_inverse(strict):
    """(I + L)^-1 for strictly lower-triangular L [..., c, c], by block forward substitution
    (recursive doubling): the inverses of the diagonal blocks of size s give those of size 2s,
    [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], log2(c) rounds of batched matmuls
    (about c^3 / 3 multiply-adds) whose intermediates are blocks of the true inverse. Plain
    matmuls, so differentiable as such (XLA's CPU triangular solve made the backward pass ~10x
    slower; a product of powers of L would hold huge cancelling terms)."""
    c = strict.shape[-1]
    p = 1 << max(0, (c - 1).bit_length())
    lead = strict.shape[:-2]
    if p != c:  # pad to a power of two: (I + [[L, 0], [0, 0]])^-1 = [[(I + L)^-1, 0], [0, I]]
        strict = jnp.pad(strict, [(0, 0)] * len(lead) + [(0, p - c), (0, p - c)])
    blocks = jnp.ones(lead + (p, 1, 1), strict.dtype)           # inverses of the 1 x 1 blocks
    s = 1
    while s < p:
        nb = p // (2 * s)
        lr = strict.reshape(lead + (nb, 2 * s, nb, 2 * s))
        diag = jnp.moveaxis(jnp.diagonal(lr, axis1=-4, axis2=-2), -1, -3)  # [.., nb, 2s, 2s]
        a, d = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        x = -(d @ diag[..., s:, :s] @ a)
        zeros = jnp.zeros_like(a)
        blocks = jnp.concatenate([jnp.concatenate([a, zeros], -1),
                                  jnp.concatenate([x, d], -1)], -2)  # [.., nb, 2s, 2s]
        s *= 2
    return blocks[..., 0, :c, :c]


def delta_chunkwise(q, k, v, beta, g, chunk_size: int):
    """Causal (gated) delta rule, chunkwise. q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; beta, g:
    [B, H, T] write strengths and log decays (g = 0: deltanet). -> [B, H, T, Dv]:
    o_t = S_t^T q_t, S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, S_0 = 0."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    qc, kc, vc = (to_chunks(x, c) for x in (q, k, v))            # [B, H, N, c, .]
    bc, gc = to_chunks(beta[..., None], c)[..., 0], to_chunks(g[..., None], c)[..., 0]
    cum = jnp.cumsum(gc, axis=-1)                                # [B, H, N, c]
    end = cum[..., -1]                                           # [B, H, N]
    tril = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    gap = cum[..., :, None] - cum[..., None, :]                  # G_i - G_j
    gamma = jnp.where(tril, jnp.exp(jnp.where(tril, gap, 0.0)), 0.0)
    kk = jnp.einsum("bhnid,bhnjd->bhnij", kc, kc)
    inv = unit_lower_inverse(jnp.where(strict, bc[..., :, None] * gamma * kk, 0.0))
    u = jnp.einsum("bhnij,bhnjd->bhnid", inv, bc[..., None] * vc)          # [B, H, N, c, Dv]
    w = jnp.einsum("bhnij,bhnjd->bhnid", inv, (bc * jnp.exp(cum))[..., None] * kc)
    qk = jnp.einsum("bhnid,bhnjd->bhnij", qc, kc) * gamma
    qg = qc * jnp.exp(cum)[..., None]
    kd = kc * jnp.exp(end[..., None] - cum)[..., None]

    def step(s, x):
        u, w, qk, qg, kd, decay = x
        new = u - jnp.einsum("bhck,bhkv->bhcv", w, s)
        out = jnp.einsum("bhck,bhkv->bhcv", qg, s) + jnp.einsum("bhij,bhjv->bhiv", qk, new)
        s = jnp.exp(decay)[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", kd, new)
        return s, out

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u, w, qk, qg, kd, end))
    _, out = jax.lax.scan(step, jnp.zeros((b, h, dk, dv), u.dtype), xs)
    return jnp.moveaxis(out, 0, 2).reshape(b, h, -1, dv)[:, :, :t]


def gates(k, *, beta_proj, beta_bias, decay_proj=None, decay_bias=None, decay_log_rate=None):
    """k [B, T, H, D] -> (beta, log alpha) [B, H, T] each (log alpha = 0 without decay params)."""
    x = jnp.einsum("bthd,hd->bht", k, beta_proj.astype(k.dtype))
    beta = jax.nn.sigmoid(x + beta_bias.astype(k.dtype)[None, :, None])
    if decay_proj is None:
        return beta, jnp.zeros_like(beta)
    a = jnp.einsum("bthd,hd->bht", k, decay_proj.astype(k.dtype))
    a = jax.nn.softplus(a + decay_bias.astype(k.dtype)[None, :, None])
    return beta, -jnp.exp(decay_log_rate.astype(k.dtype))[None, :, None] * a


def _attend(name, q, k, v, kv_mask, causal, chunk_size, output_norm, params, run=None):
    """Checks, gates, masking, both directions and the output norm around run(q, k, v, beta,
    g), a causal delta rule on heads-first [B, H, T, .] arrays (default: delta_chunkwise at
    chunk_size; attention/pallas/delta.py passes its kernel)."""
    check_lengths(name, q, k, v, kv_mask)
    if params.get("beta_proj") is None or params["beta_proj"].shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: params {sorted(k for k in params)} of head_dim "
                         f"{q.shape[-1]} required (from init_state)")
    out_dtype, dt = v.dtype, compute_dtype(q, k, v)
    q, k, v = (x.astype(dt) for x in (q, k, v))
    mask = jnp.ones(k.shape[:2], bool) if kv_mask is None else kv_mask
    beta, g = gates(k, **params)
    beta, g = jnp.where(mask[:, None], beta, 0.0), jnp.where(mask[:, None], g, 0.0)
    m4 = mask[:, None, :, None]
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))      # [B, H, T, D]
    kt = jnp.where(m4, l2_normalize(kt), 0.0)
    vt = jnp.where(m4, vt, 0.0)
    if run is None:
        run = lambda *xs: delta_chunkwise(*xs, chunk_size)  # noqa: E731
    out = bidirectional(run, causal, l2_normalize(qt), kt, vt, beta, g)
    if output_norm:
        out = rms_norm(out)
    return jnp.swapaxes(out, 1, 2).astype(out_dtype)


def init_state(key, *, q_len, kv_len, num_heads, head_dim, chunk_size, output_norm):
    """beta_proj [H, D] ~ N(0, 1/D), beta_bias [H] = 0 (beta ~ 0.5 at the start)."""
    del q_len, kv_len, chunk_size, output_norm
    w = jax.random.normal(key, (num_heads, head_dim)) * head_dim ** -0.5
    return {"params": {"beta_proj": w, "beta_bias": jnp.zeros((num_heads,))}, "buffers": {}}


def init_state_gated(key, *, q_len, kv_len, num_heads, head_dim, chunk_size, output_norm):
    """deltanet's, plus decay_proj [H, D] ~ N(0, 1/D), decay_bias [H] = softplus^-1(dt) with dt
    log-uniform in [0.001, 0.1], decay_log_rate [H] = log A, A uniform in [1, 16] (Mamba-2's
    initialisation, as Gated DeltaNet's)."""
    del q_len, kv_len, chunk_size, output_norm
    kb, kw, kd, ka = jax.random.split(key, 4)
    beta_proj = jax.random.normal(kb, (num_heads, head_dim)) * head_dim ** -0.5
    decay_proj = jax.random.normal(kw, (num_heads, head_dim)) * head_dim ** -0.5
    dt = jnp.exp(jax.random.uniform(kd, (num_heads,), minval=math.log(1e-3),
                                    maxval=math.log(1e-1)))
    a = jax.random.uniform(ka, (num_heads,), minval=1.0, maxval=16.0)
    return {"params": {"beta_proj": beta_proj, "beta_bias": jnp.zeros((num_heads,)),
                       "decay_proj": decay_proj, "decay_bias": dt + jnp.log(-jnp.expm1(-dt)),
                       "decay_log_rate": jnp.log(a)}, "buffers": {}}


HPARAMS = {"chunk_size": Int(64, min=1), "output_norm": Flag(True)}


@register("deltanet", supports_causal=True, complexity="O(n)", init_state=init_state,
          hparams=HPARAMS,
          doc="Schlag et al. 2021 / Yang et al. 2024 (DeltaNet): delta-rule state, chunkwise "
              "WY form; beta from k; causal=False is a forward + backward recurrence")
def deltanet_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, output_norm,
                       beta_proj=None, beta_bias=None):
    """q, k, v: [B, T, H, D]; kv_mask: bool [B, T]. -> [B, T, H, Dv]."""
    return _attend("deltanet", q, k, v, kv_mask, causal, chunk_size, output_norm,
                   {"beta_proj": beta_proj, "beta_bias": beta_bias})


@register("gated_deltanet", supports_causal=True, complexity="O(n)", init_state=init_state_gated,
          hparams=HPARAMS,
          doc="Yang et al. 2025 (Gated DeltaNet): delta rule with a scalar decay gate, "
              "chunkwise; gates from k; causal=False is a forward + backward recurrence")
def gated_deltanet_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, output_norm,
                             beta_proj=None, beta_bias=None, decay_proj=None, decay_bias=None,
                             decay_log_rate=None):
    """q, k, v: [B, T, H, D]; kv_mask: bool [B, T]. -> [B, T, H, Dv]."""
    return _attend("gated_deltanet", q, k, v, kv_mask, causal, chunk_size, output_norm,
                   {"beta_proj": beta_proj, "beta_bias": beta_bias, "decay_proj": decay_proj,
                    "decay_bias": decay_bias, "decay_log_rate": decay_log_rate})
