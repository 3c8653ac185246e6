"""Differential attention (attention/diff.py) through the flash kernel: A1 V and A2 V are two
calls of the dense block-sparse flash attention (attention/pallas/block_sparse.py) on the halves
(q1, k1) and (q2, k2) with the full V, then out = A1 V - lambda A2 V and the per-head norm of
the XLA variant. Two passes over the keys instead of one fused kernel; the difference is taken
after each map's output is rounded to the input dtype (exact in float32; in bfloat16 the
cancellation of the two outputs shows their rounding).
"""

from __future__ import annotations

import jax.numpy as jnp

from attention import diff as xla
from attention import register_pallas
from attention._util import check_causal, check_qkv
from attention.pallas.block_sparse import dense_attention


@register_pallas("diff")
def diff_attention(q, k, v, *, kv_mask=None, causal=False, lambda_init, head_norm,
                   lambda_q1=None, lambda_k1=None, lambda_q2=None, lambda_k2=None,
                   block_q=None, block_k=None, interpret=None):
    """q, k: [B, T, H, D] (D even); v: [B, Tk, H, Dv] -> [B, Tq, H, Dv]."""
    check_qkv(xla.NAME, q, k, v, kv_mask)
    check_causal(xla.NAME, causal, True, q.shape[1], k.shape[1])
    (q1, q2), (k1, k2) = xla.split_halves(xla.NAME, q, k)
    if lambda_q1 is None or lambda_q1.shape != (q.shape[-1] // 2,):
        raise ValueError(f"{xla.NAME}: params lambda_q1, lambda_k1, lambda_q2, lambda_k2 "
                         f"[{q.shape[-1] // 2}] required (from init_state)")
    run = lambda qh, kh: dense_attention(  # noqa: E731
        qh, kh, v, kv_mask=kv_mask, causal=causal, block_q=block_q, block_k=block_k,
        interpret=interpret).astype(jnp.float32)
    lam = xla.diff_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init)
    out = run(q1, k1) - lam * run(q2, k2)
    return xla.finish(out, lam, lambda_init, head_norm).astype(v.dtype)
