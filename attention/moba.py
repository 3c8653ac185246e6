"""MoBA, Mixture of Block Attention (Lu et al. 2025).

Keys are cut into blocks of block_size. Each query token i scores the key blocks by
q_i . mean(k of the block) (a parameter-free gate, as in the paper) and attends to the top_k
best, exactly, in one softmax over the union:
  - its own block (the block holding position i) is always kept and counted in top_k; causal:
    j <= i inside it;
  - the other top_k - 1 are the best-scoring blocks among the eligible ones: causal, the blocks
    strictly before the own block (complete, so the gate never sees a future key); not causal,
    every other block.
top_k = 1 is the own block only (block-diagonal); top_k >= the number of blocks is dense (causal
or not). The gate is not differentiated (top-k indices), as in the paper.

Ties: blocks with equal scores are taken in ascending block order (lax.top_k keeps the lower
index first). Padding: the block mean is over the block's real keys (kv_mask); a block with no
real key is never selected (its slot stays empty; the own block is kept but its padded keys are
masked as everywhere). Keys past the length (padding to whole blocks) count as padding.

Cost: the attention gathers only the selected key blocks, per query token: O(n * top_k *
block_size * D) FLOPs, computed a few query rows at a time (lax.scan, rematerialised in the
backward pass) so that a step gathers about STEP_KEYS = 2048 keys per head. The gate itself is
q against n / block_size block means: O(n^2 / block_size * D), the paper's own gating cost,
small next to the attention while n < top_k * block_size^2 (e.g. 12K for block 64, top_k 3).

Pallas (attention/pallas/selected.py): the same gate in XLA (`block_lists`), the attention in a
flash kernel that masks each row to its selected blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention import Int, register
from attention._banded import finish, prepare, unblock
from attention._blocks import (
    Partial, merge, merge_axes, pad_axis, pair_mask, partial_attention, round_up, to_blocks)

NAME = "moba"


def block_means(kh, kvm, c: int):
    """Mean of each block's real keys: kh [B, H, N, D] (N = nb * c), kvm bool [B, N] ->
    (float32 [B, H, nb, D], has_real bool [B, nb])."""
    w = to_blocks(kvm, c, 1).astype(jnp.float32)  # [B, nb, c]
    sums = jnp.einsum("bhncd,bnc->bhnd", to_blocks(kh, c, 2).astype(jnp.float32), w)
    count = w.sum(-1)  # [B, nb]
    return sums / jnp.maximum(count, 1.0)[:, None, :, None], count > 0


def select_blocks(scores, eligible, count: int):
    """The `count` best eligible blocks per query, ties in ascending block order.

    scores: float [B, H, N, nb]; eligible: bool broadcastable to it. -> (idx int32
    [B, H, N, count], ok bool [B, H, N, count]: slot holds an eligible block)."""
    s = jnp.where(eligible, jax.lax.stop_gradient(scores), -jnp.inf)
    vals, idx = jax.lax.top_k(s, count)
    return idx.astype(jnp.int32), jnp.isfinite(vals)


def eligible_blocks(has_real, nb: int, c: int, causal: bool):
    """bool [B, 1, N, nb]: blocks a query may select besides its own (real keys; causal:
    strictly before its own block; else any other block)."""
    own = (np.arange(nb * c) // c)[:, None]
    kb = np.arange(nb)[None, :]
    rule = (kb < own) if causal else (kb != own)
    return jnp.asarray(rule)[None, None] & has_real[:, None, None, :]


def own_block_part(qb, kb, vb, kvb, c: int, causal: bool) -> Partial:
    """Each query block against its own key block (causal inside): stats [B, H, nb, c]."""
    pos = to_blocks(np.arange(qb.shape[2] * c), c, 0)
    every = lambda i, j: (i == i) & (j == j)  # noqa: E731
    return partial_attention(qb, [(kb, vb, pair_mask(every, pos, pos, kvb, causal))])


STEP_KEYS = 2048  # gathered keys per query row chunk and head in one scan step (working set)


def selected_part(qh, kb, vb, kvb, idx, ok) -> Partial:
    """Each query token against its own list of whole key blocks, one softmax over them.

    qh: [B, H, N, D]; kb, vb: [B, H, nb, c, D]; kvb: bool [B, nb, c] (real keys); idx, ok:
    [B, H, N, S] block ids and used slots per query. The queries go through a lax.scan in
    chunks of rows = max(1, STEP_KEYS // (S * c)) tokens, so a step gathers about STEP_KEYS keys
    per head ([B, H, rows, S * c, D]); the step is rematerialised in the backward pass
    (jax.checkpoint), so the gathered keys are never stacked over the steps.
    -> stats [B, H, N] (o [B, H, N, Dv]).
    """
    b, h, n = qh.shape[:3]
    s, c = idx.shape[-1], kb.shape[3]
    rows = max(1, min(n, STEP_KEYS // (s * c)))
    n_pad = round_up(n, rows)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(h)[None, :, None, None]

    @jax.checkpoint
    def step(_, xs):
        q, ix, used = xs  # [B, H, rows, D], [B, H, rows, S] x2
        kg = merge_axes(kb[bi, hi, ix], 3)  # [B, H, rows, S * c, D]
        vg = merge_axes(vb[bi, hi, ix], 3)
        mask = merge_axes(kvb[bi, ix] & used[..., None], 3)  # [B, H, rows, S * c]
        part = partial_attention(q[:, :, :, None], [(kg, vg, mask[:, :, :, None])])
        return None, part.map(lambda x: x[:, :, :, 0])

    def chunks(x, fill=0):  # [B, H, N, ...] -> [N / rows, B, H, rows, ...]
        return jnp.moveaxis(to_blocks(pad_axis(x, 2, n_pad, fill), rows, 2), 2, 0)

    _, part = jax.lax.scan(step, None, (chunks(qh), chunks(idx), chunks(ok, False)))
    return part.map(lambda x: merge_axes(jnp.moveaxis(x, 0, 2), 2)[:, :, :n])


def moba_parts(q, k, v, *, kv_mask, causal, block_size, top_k, name=NAME):
    """(own-block stats, selected-block stats or None), both [B, H, nb, c] over the padded
    length nb * c; shared with nsa's selection branch."""
    qh, kh, vh, kvm = prepare(name, q, k, v, kv_mask, causal)
    c = block_size
    n_pad = round_up(max(q.shape[1], k.shape[1]), c)
    qh, kh, vh = (pad_axis(x, 2, n_pad) for x in (qh, kh, vh))
    kvm = pad_axis(kvm, 1, n_pad, False)
    qb, kb, vb = (to_blocks(x, c, 2) for x in (qh, kh, vh))
    kvb = to_blocks(kvm, c, 1)
    own = own_block_part(qb, kb, vb, kvb, c, causal)
    chosen = selection(qh, kh, kvm, block_size=c, top_k=top_k, causal=causal)
    if chosen is None:
        return own, None
    sel = selected_part(qh, kb, vb, kvb, *chosen)
    return own, sel.map(lambda x: to_blocks(x, c, 2))


def selection(qh, kh, kvm, *, block_size, top_k, causal):
    """The gate: (idx int32, ok bool) [B, H, N, top_k - 1] the blocks each query selects
    besides its own, or None when there are none to select. qh, kh: [B, H, N, D] and kvm
    [B, N] padded to N = nb * block_size."""
    c = block_size
    nb = qh.shape[2] // c
    count = min(top_k - 1, nb - 1)
    if count <= 0:
        return None
    kmean, has_real = block_means(kh, kvm, c)
    scores = jnp.einsum("bhnd,bhmd->bhnm", qh.astype(jnp.float32), kmean)  # [B, H, N, nb]
    return select_blocks(scores, eligible_blocks(has_real, nb, c, causal), count)


def block_lists(q, k, *, kv_mask, causal, block_size, top_k):
    """Per query token, the key blocks it attends to: int32 [B, H, Tq, top_k'] (top_k' =
    min(top_k, number of blocks)), its own block first, -1 for an empty slot. For the Pallas
    kernel (attention/pallas/selected.py)."""
    c = block_size
    n_pad = round_up(max(q.shape[1], k.shape[1]), c)
    qh, kh = (pad_axis(jnp.swapaxes(x, 1, 2), 2, n_pad) for x in (q, k))
    kvm = jnp.ones(k.shape[:2], bool) if kv_mask is None else kv_mask.astype(bool)
    kvm = pad_axis(kvm, 1, n_pad, False)
    own = jnp.broadcast_to(jnp.arange(n_pad, dtype=jnp.int32) // c,
                           qh.shape[:3])[..., None]
    chosen = selection(qh, kh, kvm, block_size=c, top_k=top_k, causal=causal)
    if chosen is not None:
        idx, ok = chosen
        own = jnp.concatenate([own, jnp.where(ok, idx, -1)], axis=-1)
    return own[:, :, :q.shape[1]]


@register(NAME, supports_causal=True, complexity="O(n)",
          hparams={"block_size": Int(64, min=1), "top_k": Int(3, min=1)},
          doc="MoBA: each query attends to its own key block + the top_k - 1 blocks of highest "
              "q . mean(k), gathered (Lu et al. 2025)")
def moba_attention(q, k, v, *, kv_mask=None, causal=False, block_size, top_k):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]. -> [B, Tq, H, Dv]."""
    own, sel = moba_parts(q, k, v, kv_mask=kv_mask, causal=causal, block_size=block_size,
                          top_k=top_k)
    out = merge(own) if sel is None else merge(own, sel)
    return finish(unblock(out), q.shape[1], v.dtype)
