"""Blockwise exact attention (Rabe & Staats 2021; Dao et al. 2022, FlashAttention Alg. 1-2).

softmax(q k^T / sqrt(d)) v computed over key chunks of `chunk_size` with an online max and sum:
for chunk c, m' = max(m, rowmax(s_c)), l' = l e^(m - m') + rowsum(e^(s_c - m')),
acc' = acc e^(m - m') + e^(s_c - m') v_c; out = acc / l. The backward pass is the
FlashAttention recomputation (custom VJP): only out and the log-sum-exp are kept, and each key
chunk's probabilities are rebuilt from them, so memory is O(n * chunk_size) forward and
backward, never n x n. FLOPs are those of dense attention (plus the recomputation).

The chunk loop is a rolled lax.scan (a while loop): one chunk's [Tq, chunk] scores are live at a
time. XLA's `cost_analysis()` counts a loop body once, so its FLOPs for this variant are those of
one chunk; the true count (dense) is the body times n / chunk_size (tests/attention/test_cost.py
counts it from the jaxpr). Unrolling the loop would fix the count but lets XLA's CPU scheduler
compute every chunk's scores up front (measured: temp memory grows ~3.7x from n=512 to 1024).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from attention import Int, register
from attention._blocks import kv_mask_or_ones, pad_axis, round_up
from attention._util import NEG_INF, check_causal, check_qkv


def _chunks(x, c):
    """[B, T, ...] (T % c == 0) -> [T // c, B, c, ...] for lax.scan."""
    x = x.reshape(x.shape[0], x.shape[1] // c, c, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _chunk_mask(kv_c, start, c, q_len, causal):
    """bool [B, 1, Tq, c]: the chunk's keys that each query sees."""
    mask = kv_c[:, None, None, :]
    if causal:
        i = jnp.arange(q_len)[:, None]
        j = start + jnp.arange(c)[None, :]
        mask = mask & (j <= i)[None, None]
    return mask


def _scores(q, k_c, scale):
    # q [B, Tq, H, D], k_c [B, c, H, D] -> [B, H, Tq, c] f32
    return jnp.einsum("bqhd,bkhd->bhqk", q, k_c, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, kv, causal, c):
    """-> out [B, Tq, H, Dv] f32, lse [B, H, Tq] f32 (0 for queries that see no key)."""
    b, tq, h, _ = q.shape
    scale = 1.0 / math.sqrt(q.shape[-1])
    starts = jnp.arange(k.shape[1] // c) * c

    def step(carry, xs):
        m, l, acc = carry
        k_c, v_c, kv_c, start = xs
        mask = _chunk_mask(kv_c, start, c, tq, causal)
        s = jnp.where(mask, _scores(q, k_c, scale), NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # [B, H, Tq, c]
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(axis=-1)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v_c,
                        preferred_element_type=jnp.float32)
        acc = acc * corr[..., None] + pv
        return (m_new, l, acc), None

    init = (jnp.full((b, h, tq), NEG_INF, jnp.float32), jnp.zeros((b, h, tq), jnp.float32),
            jnp.zeros((b, h, tq, v.shape[-1]), jnp.float32))
    xs = (_chunks(k, c), _chunks(v, c), _chunks(kv, c), starts)
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]  # [B, H, Tq, Dv]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return jnp.swapaxes(out, 1, 2), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, kv, causal, c):
    out, _ = _forward(q, k, v, kv, causal, c)
    return out


def _flash_fwd(q, k, v, kv, causal, c):
    out, lse = _forward(q, k, v, kv, causal, c)
    return out, (q, k, v, kv, out, lse)


def _flash_bwd(causal, c, res, d_out):
    q, k, v, kv, out, lse = res
    tq = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    d_out = d_out.astype(jnp.float32)  # [B, Tq, H, Dv]
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out)  # rowsum(dO * O), [B, H, Tq]
    starts = jnp.arange(k.shape[1] // c) * c

    def step(dq, xs):
        k_c, v_c, kv_c, start = xs
        mask = _chunk_mask(kv_c, start, c, tq, causal)
        s = _scores(q, k_c, scale)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)  # [B, H, Tq, c]
        dv_c = jnp.einsum("bhqk,bqhd->bkhd", p, d_out)
        dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v_c.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k_c.astype(jnp.float32))
        dk_c = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(jnp.float32))
        return dq, (dk_c, dv_c)

    xs = (_chunks(k, c), _chunks(v, c), _chunks(kv, c), starts)
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), xs)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape[0], k.shape[1], *x.shape[3:])  # noqa
    return dq.astype(q.dtype), unchunk(dk).astype(k.dtype), unchunk(dv).astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


@register("blockwise", supports_causal=True, complexity="O(n^2)",
          hparams={"chunk_size": Int(128, min=1)},
          doc="Exact softmax attention over key chunks with online max/sum and a recomputing "
              "backward (Rabe & Staats 2021; FlashAttention); memory O(n * chunk_size)")
def blockwise_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
    check_qkv("blockwise", q, k, v, kv_mask)
    check_causal("blockwise", causal, True, q.shape[1], k.shape[1])
    kv = kv_mask_or_ones(kv_mask, k.shape[0], k.shape[1])
    c = min(chunk_size, k.shape[1])
    t = round_up(k.shape[1], c)
    k, v, kv = pad_axis(k, 1, t), pad_axis(v, 1, t), pad_axis(kv, 1, t, False)
    out = _flash(q, k, v, kv, bool(causal), c)
    return out.astype(v.dtype)
