"""Linear attention (Katharopoulos et al., 2020, eq. 6-9): softmax replaced by the kernel
phi(q)^T phi(k) with phi(x) = elu(x) + 1; O(n) non-causal, and causal by a chunked scan of
running sums (attention/_linearized.py). Padded keys are excluded (phi = 0), unlike the original
LRA code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Int, register
from attention._linearized import kernel_attention
from attention._util import check_causal, check_qkv

NAME = "linear"


def elu_feature(x):
    """phi(x) = elu(x) + 1 > 0, in float32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


@register(NAME, supports_causal=True, complexity="O(n)",
          hparams={"chunk_size": Int(64, min=1)},
          doc="Katharopoulos et al. 2020: linear attention, feature map elu(x) + 1")
def linear_attention(q, k, v, *, kv_mask=None, causal=False, chunk_size):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D] -> [B, Tq, H, Dv]."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))      # [B, H, T, D]
    out = kernel_attention(elu_feature(qt), elu_feature(kt), vt, kv_mask, causal=causal,
                           chunk_size=chunk_size)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)
