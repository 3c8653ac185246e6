"""BigBird block-sparse attention (Zaheer et al. 2020, Sec. 2 and App. D, "ITC" variant).

On blocks of block_size positions, query block qb sees key block kb when kb is within
num_window_blocks // 2 blocks of qb, either block is global (the first ceil(g/2) and last
floor(g/2) blocks, g = num_global_blocks), or kb is one of qb's num_random_blocks random blocks
(a per-head layout drawn once in `init_state`, a buffer). Computed as in the paper's
blocked form: ordinary query blocks gather their window blocks (shifted slices), the global
key blocks (shared) and their random blocks (per-head gather), all in one softmax with each
block counted once; global query blocks are dense rows. Cost O(n * block_size * (window +
global + random blocks)).

Deviation (docs/faithfulness.md): the trailing global blocks are the last blocks of the padded
sequence, so with padding they hold padding (masked: nothing leaks, but the default second
global block is then wasted); the paper's inputs are not padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention import Int, patterns, register
from attention._blocks import (
    dropout_keys, gather_blocks, heads_first, kv_mask_or_ones, merge, merge_axes,
    neighbours, pad_axis, pair_mask, partial_attention, round_up, to_blocks)
from attention._util import check_causal, check_qkv

NAME = "bigbird"


def _global_blocks(num_blocks: int, num_global_blocks: int) -> list[int]:
    first, last = patterns.bigbird_global_blocks(num_blocks, num_global_blocks)
    ids = set(range(min(first, num_blocks))) | set(range(max(num_blocks - last, 0), num_blocks))
    return sorted(ids)


def init_bigbird(key, *, q_len, kv_len, num_heads, head_dim, block_size, num_window_blocks,
                 num_global_blocks, num_random_blocks):
    """The random block layout: int32 [num_heads, num_blocks, num_random_blocks].

    num_blocks = ceil(max(q_len, kv_len) / block_size) at the model's maximum length. Row qb
    holds distinct blocks drawn uniformly among those outside qb's window and the global
    blocks (BigBird's choice); where fewer exist, the rest are drawn from the others and the
    attention counts each block once anyway.
    """
    del head_dim
    nb = -(-max(q_len, kv_len) // block_size)
    qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
    is_global = np.isin(np.arange(nb), _global_blocks(nb, num_global_blocks))
    preferred = (np.abs(qb - kb) > num_window_blocks // 2) & ~is_global[None, :]  # static
    layout = _draw_layout(key, preferred, num_heads, num_random_blocks)
    return {"params": {}, "buffers": {"random_layout": layout}}


@functools.partial(jax.jit, static_argnums=(2, 3))
def _draw_layout(key, preferred, num_heads: int, r: int):
    """r blocks per row, uniformly among the preferred ones first: int32 [H, nb, r]."""
    nb = preferred.shape[0]
    scores = jax.random.uniform(key, (num_heads, nb, nb)) + preferred.astype(jnp.float32)
    _, layout = jax.lax.top_k(scores, min(r, nb))  # [H, nb, min(r, nb)]
    if r > nb:  # more random blocks than blocks: the extra slots point nowhere
        layout = jnp.concatenate([layout, jnp.full((num_heads, nb, r - nb), -1, layout.dtype)],
                                 axis=-1)
    return layout.astype(jnp.int32)


@register(NAME, supports_causal=True, complexity="O(n)", init_state=init_bigbird,
          supports_dropout=True,
          hparams={"block_size": Int(64, min=1), "num_window_blocks": Int(3, min=1),
                   "num_global_blocks": Int(2, min=0), "num_random_blocks": Int(3, min=0)},
          doc="BigBird: window + global + random key blocks per query block (Zaheer et al. 2020)")
def bigbird_attention(q, k, v, *, kv_mask=None, causal=False, block_size, num_window_blocks,
                      num_global_blocks, num_random_blocks, random_layout=None,
                      dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk];
    random_layout: int [H, >= num_blocks, num_random_blocks] from init_state. -> [B, Tq, H, Dv].
    """
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    c = block_size
    n_pad = round_up(max(q.shape[1], k.shape[1]), c)
    nb = n_pad // c
    heads = q.shape[2]
    r = num_random_blocks
    if r > 0:
        if random_layout is None:
            raise ValueError(f"{NAME}: random_layout (from init_state) is required when "
                             f"num_random_blocks > 0")
        if (random_layout.ndim != 3 or random_layout.shape[0] != heads
                or random_layout.shape[1] < nb or random_layout.shape[2] != r):
            raise ValueError(
                f"{NAME}: random_layout must be int [num_heads={heads}, >= num_blocks={nb}, "
                f"num_random_blocks={r}]; got shape {tuple(random_layout.shape)} (init_state "
                f"sizes it for the model's maximum length)")
    kvm = kv_mask_or_ones(kv_mask, k.shape[0], k.shape[1])
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    reach = num_window_blocks // 2
    glob = _global_blocks(nb, num_global_blocks)
    keys = dropout_keys(dropout_rate, dropout_rng, 2)

    def blocks(x, axis, fill=0):
        return to_blocks(pad_axis(x, axis, n_pad, fill), c, axis)

    qb, kb, vb = blocks(qh, 2), blocks(kh, 2), blocks(vh, 2)  # [B, H, nb, c, D]
    kvb = blocks(kvm, 1, False)  # [B, nb, c]
    pos = blocks(np.arange(n_pad), 0)  # [nb, c]
    every = lambda i, j: (i == i) & (j == j)  # noqa: E731  (all pairs of the gathered blocks)
    after = 0 if causal else reach
    # 1) Window blocks qb - reach .. qb + reach (shifted slices).
    groups = [(neighbours(kb, reach, after, axis=2), neighbours(vb, reach, after, axis=2),
               pair_mask(every, pos, neighbours(pos, reach, after, axis=0, fill=-1),
                         neighbours(kvb, reach, after, axis=1, fill=False), causal))]
    # 2) Global key blocks (shared by all query blocks), where not already in the window.
    if glob:
        gid = np.asarray(glob)
        pos_g = pos[gid].reshape(-1)  # [len(glob) * c]
        outside = lambda i, j: jnp.abs(i // c - j // c) > reach  # noqa: E731
        groups.append((merge_axes(kb[:, :, gid], 2), merge_axes(vb[:, :, gid], 2),
                       pair_mask(outside, pos, pos_g, merge_axes(kvb[:, gid], 1), causal)))
    # 3) Random blocks (per head), where not window, not global, not an earlier duplicate.
    if r > 0:
        layout = random_layout[:, :nb].astype(jnp.int32)  # [H, nb, r]
        is_global = jnp.asarray(np.isin(np.arange(nb), glob))
        inside = (layout >= 0) & (layout < nb)
        safe = jnp.where(inside, layout, 0)
        earlier = jnp.tril(jnp.ones((r, r), bool), -1)  # [r, r']: r' < r
        dup = jnp.any((layout[..., :, None] == layout[..., None, :]) & earlier, axis=-1)
        fresh = (inside & ~dup & ~is_global[safe]
                 & (jnp.abs(jnp.arange(nb)[:, None] - layout) > reach))  # [H, nb, r]
        pos_r = (safe[..., None] * c + jnp.arange(c)).reshape(heads, nb, r * c)  # [H, nb, r*c]
        kv_r = merge_axes(kvb[:, safe], 3)  # [B, H, nb, r * c]
        i = pos[None, :, :, None]
        j = pos_r[:, :, None, :]
        mask = jnp.repeat(fresh, c, axis=-1)[:, :, None, :] & kv_r[:, :, :, None, :]
        if causal:
            mask = mask & (j <= i)[None]
        groups.append((gather_blocks(kb, safe), gather_blocks(vb, safe), mask))
    part = partial_attention(qb, groups, dropout_rate=dropout_rate, dropout_rng=keys[0])
    out = merge_axes(merge(part), 2)  # [B, H, n_pad, Dv]
    # Global query blocks see every key: dense rows.
    if glob:
        rows = np.concatenate([np.arange(g * c, (g + 1) * c) for g in glob])
        rows = rows[rows < q.shape[1]]
        if rows.size:
            mask = pair_mask(every, rows[None], np.arange(k.shape[1]), kvm, causal)
            dense = partial_attention(qh[:, :, None, rows], [(kh, vh, mask)],
                                      dropout_rate=dropout_rate, dropout_rng=keys[1])
            out = out.at[:, :, rows].set(merge(dense)[:, :, 0])
    return heads_first(out[:, :, :q.shape[1]]).astype(v.dtype)
