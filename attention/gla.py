"""Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", eq. 3 and sec. 4): a linear-attention state S_t [Dk, Dv] with a
data-dependent per-channel decay,

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,    o_t = q_t^T S_t / sqrt(Dk),

computed chunkwise-parallel: inside a chunk of c positions, cumulative log-decays G_i and the
exact masked pair term sum_{j<=i} sum_d q_id k_jd exp(G_id - G_jd) (every exponent <= 0, so
nothing overflows however strong the decay), formed one key column j at a time (a scan over
the c keys of every chunk at once, so no [c, c, Dk] tensor exists); across chunks a lax.scan
carrying the state and emitting each chunk's output. The gradient is written out (a
custom_vjp: the same scans backwards, and the log-decays' gradient chunk by chunk from
dL/dG_i = q_i dq_i - k_i dk_i plus the chunk-end decay's), so memory is O(n (Dk + Dv + c))
forward and O(n (Dk + Dv + c + Dk Dv / c)) backward (autodiff of the first form stored
[c, c, Dk] per chunk: 1.37 GiB at 4K).

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

import functools

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


def _pieces(q, k, v, g, c: int):
    """Chunked [B, H, N, c, .] q, k, v, the within-chunk cumulative log-decays G (inclusive)
    and their chunk totals G_c [B, H, N, Dk]."""
    qc, kc, vc, gc = (to_chunks(x, c) for x in (q, k, v, g))
    cum = jnp.cumsum(gc, axis=3)
    return qc, kc, vc, cum, cum[:, :, :, -1]


def _over(axis: int, step, carry, xs, reverse: bool = False, index: bool = False):
    """lax.scan of step over axis `axis` of every array in xs (index: plus the step's position
    along it, last); outputs stacked on that axis."""
    moved = [jnp.moveaxis(x, axis, 0) for x in xs]
    if index:
        moved.append(jnp.arange(moved[0].shape[0]))
    carry, ys = jax.lax.scan(step, carry, tuple(moved), reverse=reverse)
    return carry, jax.tree.map(lambda y: jnp.moveaxis(y, 0, axis), ys)


def _key_decays(cum, cj):
    """exp(min(G_i - G_j, 0)) [B, H, N, c(i), Dk] for one key row j (cj: G_j [B, H, N, Dk]):
    the decay from key j to every query i >= j of its chunk (<= 1; the clamp touches only the
    rows i < j, which the callers mask)."""
    return jnp.exp(jnp.minimum(cum - cj[:, :, :, None], 0.0))


def _intra_scores(qc, kc, cum):
    """A_ij = sum_d q_id k_jd exp(G_id - G_jd) for j <= i, else 0: [B, H, N, c(i), c(j)], one
    key column j at a time (no [c, c, Dk] tensor)."""
    rows = jnp.arange(qc.shape[3])

    def column(_, x):
        kj, cj, j = x
        a = jnp.sum(qc * kj[:, :, :, None] * _key_decays(cum, cj), axis=-1)
        return None, jnp.where(rows >= j, a, 0.0)

    return jnp.swapaxes(_over(3, column, None, (kc, cum), index=True)[1], 3, 4)


def _state_update(s, kn, vn, cn, en):
    """S <- diag(e^{G_c}) S + (K e^{G_c - G})^T V for one chunk ([B, H, c, .] slices)."""
    kd = kn * jnp.exp(en[:, :, None] - cn)
    return jnp.exp(en)[..., None] * s + jnp.einsum("bhcd,bhce->bhde", kd, vn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gla_chunkwise(q, k, v, g, chunk_size: int):
    """Causal GLA, chunkwise. q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; g: [B, H, T, Dk] log
    decays (<= 0; 0 and k = 0 at padded positions). -> [B, H, T, Dv] (no scaling, no norm):
    o_t = q_t^T S_t with S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, S_0 = 0.

    Per chunk n: O_n = (Q_n e^G) S_n + A_n V_n (A: _intra_scores), S_{n+1} = diag(e^{G_c}) S_n +
    (K_n e^{G_c - G})^T V_n, the states walked in a scan that emits each chunk's output (no
    state per chunk is stored). The gradient is written out (gla_chunkwise_bwd); memory is
    O(T (Dk + Dv + c)) forward and backward."""
    t = k.shape[2]
    c = min(chunk_size, t)
    qc, kc, vc, cum, end = _pieces(q, k, v, g, c)
    intra = jnp.einsum("bhnij,bhnje->bhnie", _intra_scores(qc, kc, cum), vc)

    def step(s, x):
        qn, kn, vn, cn, en = x
        return _state_update(s, kn, vn, cn, en), jnp.einsum("bhcd,bhde->bhce",
                                                            qn * jnp.exp(cn), s)

    s0 = jnp.zeros(k.shape[:2] + (k.shape[-1], v.shape[-1]), k.dtype)
    inter = _over(2, step, s0, (qc, kc, vc, cum, end))[1]
    return (inter + intra).reshape(*v.shape[:2], -1, v.shape[-1])[:, :, :t]


def _gla_fwd(q, k, v, g, chunk_size):
    return gla_chunkwise(q, k, v, g, chunk_size), (q, k, v, g)


def gla_chunkwise_bwd(chunk_size, res, do):
    """The gradient of gla_chunkwise. With S_n the state before chunk n, R_n the gradient of
    the state after it (R <- diag(e^{G_c}) R + (Q e^G)^T dO, walked backwards) and
    M_ij = dO_i . v_j (j <= i, else 0):
        dQ = e^G * (dO S_n^T) + sum_j M_ij k_j e^{G_i - G_j}
        dK = e^{G_c - G} * (V R_n^T) + sum_i M_ij q_i e^{G_i - G_j}
        dV = (K e^{G_c - G}) R_n + A^T dO.
    The log-decays, chunk by chunk: every term of a chunk depends on its within-chunk G only
    through q_i k_j e^{G_i - G_j}, (q_i e^{G_i}) S_n and k_j e^{G_c - G_j}, and on G_c through
    those and the state's decay, so dL/dG_i = q_i dq_i - k_i dk_i, plus at the chunk's last
    position dL/dG_c = sum_j k_j dk_j|state + e^{G_c} rowsum(S_n * R_n); dg is the reverse
    cumsum of dL/dG within the chunk. (The same identity over the whole sequence, dg_t =
    sum_{s>=t} (q_s dq_s - k_s dk_s), sums cancelling terms: in float32 at 4K positions it
    gave the gate params' gradients ~3e-5 relative error, against ~3e-7 this way.)"""
    q, k, v, g = res
    t = k.shape[2]
    c = min(chunk_size, t)
    qc, kc, vc, cum, end = _pieces(q, k, v, g, c)
    doc = to_chunks(do, c)
    rows = jnp.arange(c)
    m = jnp.where(rows[:, None] >= rows, jnp.einsum("bhnie,bhnje->bhnij", doc, vc), 0.0)

    def intra(dq, x):  # key row j: its score column, its dK, its share of every dQ_i
        kj, cj, mj, j = x
        e = _key_decays(cum, cj)
        a = jnp.where(rows >= j, jnp.sum(qc * kj[:, :, :, None] * e, axis=-1), 0.0)
        dq = dq + mj[..., None] * kj[:, :, :, None] * e
        return dq, (a, jnp.sum(mj[..., None] * qc * e, axis=3))

    dq, (a, dk) = _over(3, intra, jnp.zeros_like(qc), (kc, cum, jnp.swapaxes(m, 3, 4)),
                        index=True)                              # a: [B, H, N, c(j), c(i)]
    dv = jnp.einsum("bhnji,bhnie->bhnje", a, doc)

    def forward(s, x):  # dQ's state term; the states S_n, kept for the decays' gradient
        kn, vn, cn, en, don = x
        return _state_update(s, kn, vn, cn, en), (jnp.exp(cn) * jnp.einsum(
            "bhce,bhde->bhcd", don, s), s)

    def backward(r, x):  # dK's and dV's state terms, dL/dG_c
        qn, kn, vn, cn, en, don, sn = x
        ed = jnp.exp(en[:, :, None] - cn)
        dkn = ed * jnp.einsum("bhce,bhde->bhcd", vn, r)
        dvn = jnp.einsum("bhcd,bhde->bhce", kn * ed, r)
        dgc = jnp.sum(kn * dkn, axis=2) + jnp.exp(en) * jnp.sum(sn * r, axis=-1)
        r = jnp.exp(en)[..., None] * r + jnp.einsum("bhcd,bhce->bhde", qn * jnp.exp(cn), don)
        return r, (dkn, dvn, dgc)

    s0 = jnp.zeros(k.shape[:2] + (k.shape[-1], v.shape[-1]), k.dtype)
    _, (dqs, states) = jax.lax.scan(forward, s0, tuple(jnp.moveaxis(x, 2, 0) for x in (
        kc, vc, cum, end, doc)))
    dq = dq + jnp.moveaxis(dqs, 0, 2)
    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (qc, kc, vc, cum, end, doc)) + (states,)
    _, ys = jax.lax.scan(backward, s0, xs, reverse=True)
    dks, dvs, dgc = (jnp.moveaxis(y, 0, 2) for y in ys)
    dk, dv = dk + dks, dv + dvs
    dgl = (qc * dq - kc * dk).at[:, :, :, -1].add(dgc)          # dL/dG within each chunk
    dg = jax.lax.cumsum(dgl, axis=3, reverse=True)
    return tuple(x.reshape(*x.shape[:2], -1, x.shape[-1])[:, :, :t] for x in (dq, dk, dv, dg))


gla_chunkwise.defvjp(_gla_fwd, gla_chunkwise_bwd)


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
