"""Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", eq. 3 and sec. 4): a linear-attention state S_t [Dk, Dv] with a
data-dependent per-channel decay,

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,    o_t = q_t^T S_t / sqrt(Dk),

computed chunkwise-parallel: inside a chunk of c positions, cumulative log-decays G_i and the
exact masked pair term sum_{j<=i} sum_d q_id k_jd exp(G_id - G_jd) (every exponent <= 0, so
nothing overflows however strong the decay: the [c, c, Dk] pair tensor is formed per chunk,
memory O(n c Dk), hence a small default chunk); across chunks a lax.scan over the chunk states.

The contract gives q, k, v only, so the gate comes from the keys: log alpha_t =
log_sigmoid(k_t W_down W_up + b) / gate_temperature (the paper's low-rank gate of rank 16 and
temperature tau = 16, there a projection of the layer input x_t; here of k_t, per head; the
params gate_down [H, D, r], gate_up [H, r, D], gate_bias [H, D] come from init_state). Feature
map: identity on q and k (q scaled by 1/sqrt(Dk)), no denominator; output_norm: an RMS
normalisation of each head's output (the paper's per-head norm, without its affine weight and
without the swish output gate, which the contract has no input for).

Causal is the paper's form. causal=False is a declared bidirectional form (used by the LRA
classification tasks): the forward recurrence plus the same recurrence run from the end of the
sequence (each includes the token itself). Padded keys neither write nor decay the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Flag, Float, Int, register
from attention._util import check_qkv

NAME = "gla"
RMS_EPS = 1e-5


def compute_dtype(*xs):
    """float64 for float64 inputs (the tests' references), float32 otherwise."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def rms_norm(x, eps: float = RMS_EPS):
    """x / rms(x) over the last axis (no affine weight); a zero row stays zero."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def to_chunks(x, c: int):
    """[B, H, T, ...] -> [B, H, N, c, ...], zero-padded to N * c positions."""
    b, h, t = x.shape[:3]
    n = -(-t // c)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(b, h, n, c, *x.shape[3:])


def bidirectional(causal_fn, causal: bool, *xs):
    """causal_fn(*xs) (heads-first, time axis 2); causal=False: plus the same recurrence run
    backwards in time (both include the token itself)."""
    out = causal_fn(*xs)
    if causal:
        return out
    back = causal_fn(*(jnp.flip(x, axis=2) for x in xs))
    return out + jnp.flip(back, axis=2)


def check_lengths(name, q, k, v, kv_mask):
    check_qkv(name, q, k, v, kv_mask)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{name}: a recurrence needs q_len == kv_len (self-attention); got "
                         f"{q.shape[1]}, {k.shape[1]}")


def gla_chunkwise(q, k, v, g, chunk_size: int):
    """Causal GLA, chunkwise. q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; g: [B, H, T, Dk] log
    decays (<= 0; 0 and k = 0 at padded positions). -> [B, H, T, Dv] (no scaling, no norm):
    o_t = q_t^T S_t with S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, S_0 = 0."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    qc, kc, vc, gc = (to_chunks(x, c) for x in (q, k, v, g))   # [B, H, N, c, .]
    cum = jnp.cumsum(gc, axis=3)                                # G_i, inclusive
    end = cum[:, :, :, -1]                                      # [B, H, N, Dk]
    tril = jnp.tril(jnp.ones((c, c), bool))[:, :, None]          # [c(i), c(j), 1]
    gap = cum[:, :, :, :, None, :] - cum[:, :, :, None, :, :]    # G_i - G_j, [B,H,N,c,c,Dk]
    pair = jnp.where(tril, jnp.exp(jnp.where(tril, gap, 0.0)), 0.0)
    scores = jnp.einsum("bhnid,bhnijd->bhnij", qc, pair * kc[:, :, :, None, :, :])
    intra = jnp.einsum("bhnij,bhnjd->bhnid", scores, vc)
    # Chunk contributions to the state at the chunk's end, and the scan over chunks.
    kd = kc * jnp.exp(end[:, :, :, None, :] - cum)
    u = jnp.einsum("bhncd,bhnce->bhnde", kd, vc)                # [B, H, N, Dk, Dv]

    def step(s, x):
        decay, du = x
        return jnp.exp(decay)[..., None] * s + du, s

    s0 = jnp.zeros((b, h, dk, dv), u.dtype)
    _, before = jax.lax.scan(step, s0, (jnp.moveaxis(end, 2, 0), jnp.moveaxis(u, 2, 0)))
    before = jnp.moveaxis(before, 0, 2)                         # state before each chunk
    inter = jnp.einsum("bhncd,bhnde->bhnce", qc * jnp.exp(cum), before)
    return (inter + intra).reshape(b, h, -1, dv)[:, :, :t]


def log_gates(k, gate_down, gate_up, gate_bias, gate_temperature):
    """log alpha = log_sigmoid(k W_down W_up + b) / tau. k: [B, T, H, D] -> [B, H, T, D]."""
    low = jnp.einsum("bthd,hdr->bthr", k, gate_down.astype(k.dtype))
    x = jnp.einsum("bthr,hre->bhte", low, gate_up.astype(k.dtype))
    return jax.nn.log_sigmoid(x + gate_bias.astype(k.dtype)[None, :, None]) / gate_temperature


def init_state(key, *, q_len, kv_len, num_heads, head_dim, chunk_size, gate_rank,
               gate_temperature, output_norm):
    """params: gate_down [H, D, r] ~ N(0, 1/D), gate_up [H, r, D] ~ N(0, 1/r), gate_bias
    [H, D] = 0 (initial decays sigmoid(~0)^(1/tau) ~ 0.96 per step at tau = 16)."""
    del q_len, kv_len, chunk_size, gate_temperature, output_norm
    k1, k2 = jax.random.split(key)
    down = jax.random.normal(k1, (num_heads, head_dim, gate_rank)) * head_dim ** -0.5
    up = jax.random.normal(k2, (num_heads, gate_rank, head_dim)) * gate_rank ** -0.5
    return {"params": {"gate_down": down, "gate_up": up,
                       "gate_bias": jnp.zeros((num_heads, head_dim))}, "buffers": {}}


@register(NAME, supports_causal=True, complexity="O(n)", init_state=init_state,
          hparams={"chunk_size": Int(16, min=1), "gate_rank": Int(16, min=1),
                   "gate_temperature": Float(16.0, lo=1e-3), "output_norm": Flag(True)},
          doc="Yang et al. 2024 (GLA): linear attention with per-channel data-dependent decay, "
              "chunkwise; gate from k; causal=False is a forward + backward recurrence")
def gla_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size, gate_rank,
                  gate_temperature, output_norm, gate_down=None, gate_up=None, gate_bias=None):
    """q, k, v: [B, T, H, D]; kv_mask: bool [B, T]. -> [B, T, H, Dv]."""
    return gated_attention(NAME, q, k, v, kv_mask, causal, gate_rank=gate_rank,
                           gate_temperature=gate_temperature, output_norm=output_norm,
                           gate_down=gate_down, gate_up=gate_up, gate_bias=gate_bias,
                           run=lambda *xs: gla_chunkwise(*xs, chunk_size))


def gated_attention(name, q, k, v, kv_mask, causal, *, gate_rank, gate_temperature,
                    output_norm, gate_down, gate_up, gate_bias, run):
    """Checks, gates, masking, both directions and the output norm around run(q, k, v, g), a
    causal GLA on heads-first [B, H, T, .] arrays (the XLA chunkwise form or a kernel)."""
    check_lengths(name, q, k, v, kv_mask)
    d = q.shape[-1]
    if gate_down is None or tuple(gate_down.shape[1:]) != (d, gate_rank):
        raise ValueError(f"{name}: params gate_down [H, {d}, {gate_rank}], gate_up, gate_bias "
                         f"required (from init_state)")
    out_dtype, dt = v.dtype, compute_dtype(q, k, v)
    q, k, v = (x.astype(dt) for x in (q, k, v))
    mask = jnp.ones(k.shape[:2], bool) if kv_mask is None else kv_mask
    m4 = mask[:, None, :, None]                                  # [B, 1, T, 1]
    g = jnp.where(m4, log_gates(k, gate_down, gate_up, gate_bias, gate_temperature), 0.0)
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))      # [B, H, T, D]
    kt, vt = jnp.where(m4, kt, 0.0), jnp.where(m4, vt, 0.0)
    out = bidirectional(run, causal, qt * d ** -0.5, kt, vt, g)
    if output_norm:
        out = rms_norm(out)
    return jnp.swapaxes(out, 1, 2).astype(out_dtype)
