"""NSA, Native Sparse Attention (Yuan et al. 2025): three branches on the same query, mixed by
learned per-head gates.

  compressed  each block of block_size keys/values is one token: the mean of its real keys and
              of their values (a block with no real key is not a token). Causal: a query sees
              the blocks that are complete at its position ((b + 1) * block_size - 1 <= i).
              Softmax over these tokens (n / block_size of them).
  selected    the query's own block (causal inside) plus the top_k - 1 blocks that the
              compressed branch scores highest for this query (ranking by the compressed
              attention probabilities = ranking by q . mean(k), the softmax being monotone);
              causal: among the blocks strictly before the own block. Exact softmax over the
              gathered blocks (attention/moba.py's machinery: the own block is counted in
              top_k; ties go to the lower block; blocks without a real key are never picked).
  window      sliding window abs(i - j) <= window (causal: i - window <= j <= i), banded.

  out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, g = sigmoid(q_h . W_h + b_h) per token
  and head (params gate_w [H, D, 3], gate_b [H, 3] from init_state: the contract hands the
  variant q, k, v only, so the gate reads the query instead of the paper's input x).

Each branch has its own softmax; a branch with no visible key gives zeros. causal=False is
offered too (every block token, selection among all other blocks, a two-sided window).

Deviations (docs/faithfulness.md): the paper compresses overlapping blocks (length l = 32,
stride d = 16) with a learned MLP with intra-block positions and selects blocks of l' = 64
scored through its eq. 9; here compression and selection share non-overlapping blocks and the
compression is a mean (parameter-free), so selection scores are the compressed scores directly
(the paper's eq. 8 case l = l' = d). The paper always selects the initial block and the 2 local
blocks; here the own block is always selected and the window branch covers the local context.
GQA group-shared selection (eq. 10) does not apply: every head selects for itself.

Pallas (attention/pallas/selected.py): the selected branch on moba's kernels, the window on the
local kernel, the compressed branch in XLA, the same gates.

Cost: window O(n * window), selection O(n * top_k * block_size) gathered per token (scan),
compressed O(n^2 / block_size) (the paper's own compression cost), all times D. The compressed
branch dominates from a few thousand positions on (blocks of 32: measured FLOPs exponent 1.3-1.5
over 1K-16K, results/cost_cpu_part3a.md), so the registered class is "O(n^2/s)" with s =
block_size, not the linear class of the selection and window branches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention import Int, patterns, register
from attention._banded import band, finish, prepare, unblock
from attention._blocks import merge, pad_axis, pair_mask, partial_attention, round_up
from attention.moba import block_means, moba_parts

NAME = "nsa"
BRANCHES = ("compressed", "selected", "window")


def init_nsa(key, *, q_len, kv_len, num_heads, head_dim, block_size, top_k, window):
    """params: gate_w float32 [H, D, 3] (normal, std 1/sqrt(D)), gate_b [H, 3] (zeros)."""
    del q_len, kv_len, block_size, top_k, window
    w = jax.random.normal(key, (num_heads, head_dim, 3), jnp.float32) / np.sqrt(head_dim)
    return {"params": {"gate_w": w, "gate_b": jnp.zeros((num_heads, 3), jnp.float32)},
            "buffers": {}}


def gates(q, gate_w, gate_b):
    """sigmoid(q . W + b): float32 [B, Tq, H, 3] (compressed, selected, window)."""
    h, d = q.shape[2], q.shape[3]
    for field, p, shape in (("gate_w", gate_w, (h, d, 3)), ("gate_b", gate_b, (h, 3))):
        if p is None or tuple(p.shape) != shape:
            raise ValueError(f"{NAME}: {field} must be {list(shape)} (from init_state); got "
                             f"{None if p is None else tuple(p.shape)}")
    logits = jnp.einsum("bthd,hdg->bthg", q.astype(jnp.float32), gate_w.astype(jnp.float32))
    return jax.nn.sigmoid(logits + gate_b.astype(jnp.float32)[None, None])


def branches(q, k, v, *, kv_mask=None, causal=False, block_size, top_k, window):
    """The three branch outputs, each float32 [B, Tq, H, Dv] (compressed, selected, window)."""
    qh, kh, vh, kvm = prepare(NAME, q, k, v, kv_mask, causal)
    f32 = lambda x: finish(x, q.shape[1], jnp.float32)  # noqa: E731
    cmp = _compressed(qh, kh, vh, kvm, causal=causal, block_size=block_size)
    # Selected: own block + the best top_k - 1 blocks by the compressed scores.
    own, sel = moba_parts(q, k, v, kv_mask=kv_mask, causal=causal, block_size=block_size,
                          top_k=top_k, name=NAME)
    slc = unblock(merge(own) if sel is None else merge(own, sel))
    # Window.
    qb, kb, vb, kvb, pq, pk = band(qh, kh, vh, kvm, window=window, causal=causal)
    keep = lambda i, j: patterns.local(i, j, window=window)  # noqa: E731
    win = unblock(merge(partial_attention(qb, [(kb, vb, pair_mask(keep, pq, pk, kvb, causal))])))
    return f32(cmp), f32(slc), f32(win)


def compressed_branch(q, k, v, *, kv_mask=None, causal=False, block_size):
    """The compressed branch alone: float32 [B, Tq, H, Dv] (the Pallas path uses it)."""
    qh, kh, vh, kvm = prepare(NAME, q, k, v, kv_mask, causal)
    return finish(_compressed(qh, kh, vh, kvm, causal=causal, block_size=block_size),
                  q.shape[1], jnp.float32)


def _compressed(qh, kh, vh, kvm, *, causal, block_size):
    """Block means of the real keys and values, one token per block: [B, H, Tq, Dv] f32."""
    tq = qh.shape[2]
    c = block_size
    n_pad = round_up(max(qh.shape[2], kh.shape[2]), c)
    nb = n_pad // c
    kvm_p = pad_axis(kvm, 1, n_pad, False)
    kc, has_real = block_means(pad_axis(kh, 2, n_pad), kvm_p, c)  # [B, H, nb, D], [B, nb]
    vc, _ = block_means(pad_axis(vh, 2, n_pad), kvm_p, c)
    pos_q = np.arange(tq)[None]  # one group of all queries
    last = np.arange(nb) * c + c - 1  # last position of each block
    seen = (lambda i, j: j <= i) if causal else (lambda i, j: (i == i) & (j == j))
    mask = pair_mask(seen, pos_q, last, has_real, False)  # [B, 1, 1, Tq, nb]
    return merge(partial_attention(qh[:, :, None], [(kc.astype(qh.dtype), vc.astype(vh.dtype),
                                                     mask)]))[:, :, 0]


@register(NAME, supports_causal=True, complexity="O(n^2/s)", init_state=init_nsa,
          hparams={"block_size": Int(32, min=1), "top_k": Int(4, min=1), "window": Int(64, min=0)},
          doc="NSA: compressed block tokens + top_k selected blocks + sliding window, mixed by "
              "sigmoid gates from q (Yuan et al. 2025)")
def nsa_attention(q, k, v, *, kv_mask=None, causal=False, block_size, top_k, window,
                  gate_w=None, gate_b=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]; gate_w [H, D, 3],
    gate_b [H, 3] from init_state. -> [B, Tq, H, Dv]."""
    g = gates(q, gate_w, gate_b)
    outs = branches(q, k, v, kv_mask=kv_mask, causal=causal, block_size=block_size,
                    top_k=top_k, window=window)
    out = sum(g[..., n, None] * o for n, o in enumerate(outs))
    return out.astype(v.dtype)
