"""Block masks for block-sparse flash attention (the block lists of PyTorch FlexAttention).

The sequence is cut into query blocks of `block_q` rows and key blocks of `block_k` columns. For
a pattern keep(i, j) from attention/patterns.py (plus causality, the key length and padding via
kv_mask) a key block is *listed* for a query block iff at least one pair (i, j) in the tile is
kept, and *full* iff every pair is kept (the kernel then needs no mask). Query rows past q_len
are outputs that are sliced off, so they do not count either way.

Lists are stored one row per query block as int32 [..., 2 + K]:
    [num_full, num_listed, kb_0, kb_1, ..., kb_{K-1}]
with the full blocks first (ascending), then the partial ones (ascending); entries past
num_listed are unused. The kernel loops t over [0, num_full) without a mask and over
[num_full, num_listed) with one. The same layout transposed (one row per key block, listing
query blocks) drives the dK/dV backward kernel.

The pattern part is static (numpy, cached per shape); padding (kv_mask) and bigbird's random
layout may be traced arrays, so those parts are combined with jnp inside the caller's jit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention import patterns

HEADER = 2  # num_full, num_listed


@dataclasses.dataclass(frozen=True)
class Rule:
    """A fixed pattern as a hashable value: keep(i, j) = patterns.<pattern>(i, j, **hparams),
    restricted to j <= i when causal. pattern=None keeps every pair (dense)."""

    pattern: str | None = None
    hparams: tuple[tuple[str, Any], ...] = ()
    causal: bool = False

    @classmethod
    def make(cls, pattern, causal=False, **hparams):
        return cls(pattern, tuple(sorted(hparams.items())), bool(causal))

    def keep(self, i, j):
        """bool array broadcast from integer positions i (query) and j (key)."""
        keep = None
        if self.pattern is not None:
            keep = getattr(patterns, self.pattern)(i, j, **dict(self.hparams))
        if self.causal:
            c = j <= i
            keep = c if keep is None else keep & c
        return keep  # None: every pair kept


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Block lists for one (q_len, kv_len, block_q, block_k) shape.

    kv_lists: int32 [B', H', num_q_blocks, 2 + K]: per query block, the key blocks to visit.
    q_lists: int32 [B', H', num_k_blocks, 2 + Kt]: per key block, the query blocks that visit it.
    B' is the batch when kv_mask was given, else 1 (shared by the batch); H' is the number of
    heads when the layout differs per head (bigbird's random blocks), else 1.
    """

    kv_lists: jax.Array
    q_lists: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_k: int = dataclasses.field(metadata=dict(static=True))
    # Every row of kv_lists / q_lists lists consecutive ascending blocks (dense; causal
    # kv_lists): the kernels then step from the first entry instead of reading each index.
    kv_contiguous: bool = dataclasses.field(default=False, metadata=dict(static=True))
    q_contiguous: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_full(self):
        return self.kv_lists[..., 0]

    @property
    def num_listed(self):
        return self.kv_lists[..., 1]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=64)
def block_states(rule: Rule, q_len: int, kv_len: int, block_q: int, block_k: int):
    """(listed, full): numpy bool [num_q_blocks, num_k_blocks] for `rule` on this shape.

    Evaluates the exact predicate on every pair, a few query blocks at a time (numpy, once per
    shape: a few seconds at 16K on a CPU); key positions >= kv_len are never kept.
    """
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    j = np.arange(nk * block_k, dtype=np.int32)[None, :]
    listed = np.zeros((nq, nk), bool)
    full = np.zeros((nq, nk), bool)
    rows_per_chunk = max(1, (1 << 22) // (nk * block_k * block_q))
    for start in range(0, nq, rows_per_chunk):
        stop = min(nq, start + rows_per_chunk)
        i = np.arange(start * block_q, stop * block_q, dtype=np.int32)[:, None]
        keep = rule.keep(i, j)
        keep = np.ones((i.shape[0], j.shape[1]), bool) if keep is None else np.asarray(keep)
        keep = np.broadcast_to(keep, (i.shape[0], j.shape[1])) & (j < kv_len)
        real_row = i < q_len  # rows past q_len are sliced off: neither listed nor unfull
        tiles = (keep & real_row).reshape(stop - start, block_q, nk, block_k)
        listed[start:stop] = tiles.any(axis=(1, 3))
        tiles = (keep | ~real_row).reshape(stop - start, block_q, nk, block_k)
        full[start:stop] = tiles.all(axis=(1, 3))
    return listed, full & listed


def _sort_key(listed, full, xp):
    # 0: full, 1: partial, 2: not visited. A stable sort keeps each group ascending.
    return xp.where(full, 0, xp.where(listed, 1, 2)).astype(xp.int32)


def _argsort(x, xp):
    if xp is np:
        return np.argsort(x, axis=-1, kind="stable")
    return jnp.argsort(x, axis=-1, stable=True)


def lists_from_states(listed, full, *, width: int | None = None, index=None, xp=np):
    """Block lists [..., 2 + width] from per-candidate states [..., C].

    index: the block id of each candidate [..., C] (default: 0..C-1). width: number of list
    entries kept (default C; numpy: the largest count, at least 1).
    """
    listed = xp.asarray(listed)
    full = xp.asarray(full) & listed
    cand = listed.shape[-1]
    if index is None:
        index = xp.broadcast_to(xp.arange(cand, dtype=xp.int32), listed.shape)
    order = _argsort(_sort_key(listed, full, xp), xp)
    index = xp.take_along_axis(xp.asarray(index, dtype=xp.int32), order, axis=-1)
    num_full = full.sum(-1).astype(xp.int32)
    num_listed = listed.sum(-1).astype(xp.int32)
    if width is None:
        width = max(1, int(num_listed.max())) if (xp is np and listed.size) else cand
    index = index[..., :width]
    if index.shape[-1] < width:  # pad (never read past num_listed)
        pad = [(0, 0)] * (index.ndim - 1) + [(0, width - index.shape[-1])]
        index = xp.pad(index, pad)
    return xp.concatenate([num_full[..., None], num_listed[..., None], index], axis=-1)


def is_contiguous(lists) -> bool:
    """True when every row of numpy lists [R, 2 + K] lists consecutive ascending blocks."""
    lists = np.asarray(lists)
    idx = lists[:, HEADER:]
    t = np.arange(idx.shape[1])
    used = t[None, :] < lists[:, 1:2]
    return bool(np.all(~used | (idx == idx[:, :1] + t[None, :])))


@functools.lru_cache(maxsize=64)
def static_lists(rule: Rule, q_len: int, kv_len: int, block_q: int, block_k: int):
    """(kv_lists [nq, 2+K], q_lists [nk, 2+Kt]) as numpy int32 for a static rule."""
    listed, full = block_states(rule, q_len, kv_len, block_q, block_k)
    return lists_from_states(listed, full), lists_from_states(listed.T, full.T)


def kv_block_states(kv_mask, kv_len: int, block_k: int):
    """(any_real, all_real): bool [B, num_k_blocks] from kv_mask [B, kv_len] (traced ok)."""
    nk = _cdiv(kv_len, block_k)
    m = jnp.pad(kv_mask.astype(bool), ((0, 0), (0, nk * block_k - kv_len)))
    m = m.reshape(m.shape[0], nk, block_k)
    return m.any(-1), m.all(-1)


def restrict(lists, row_any, row_all, cand_any, cand_all):
    """Lists narrowed by per-batch block states (jnp; traced ok).

    lists: [R, 2 + K] static lists (R rows). row_any/row_all: [B, R] state of each row's own
    block, or None; cand_any/cand_all: [B, R, K] state of each listed candidate, or None.
    A candidate stays listed iff it was and every given *_any holds; it stays full iff it was
    and every given *_all holds.
    """
    lists = jnp.asarray(lists)
    width = lists.shape[-1] - HEADER
    t = jnp.arange(width, dtype=jnp.int32)
    listed = t < lists[:, 1:2]  # [R, K]
    full = t < lists[:, 0:1]
    index = lists[:, HEADER:]
    batch = (row_any if row_any is not None else cand_any).shape[0]
    listed = jnp.broadcast_to(listed, (batch,) + listed.shape)
    full = jnp.broadcast_to(full, (batch,) + full.shape)
    if row_any is not None:
        listed = listed & row_any[:, :, None]
        full = full & row_all[:, :, None]
    if cand_any is not None:
        listed = listed & cand_any
        full = full & cand_all
    index = jnp.broadcast_to(index, listed.shape)
    return lists_from_states(listed, full, width=width, index=index, xp=jnp)


def from_rule(rule: Rule, q_len: int, kv_len: int, block_q: int, block_k: int,
              kv_mask=None) -> BlockMask:
    """The block mask of a static rule, narrowed by kv_mask [B, kv_len] when given."""
    kv_lists, q_lists = static_lists(rule, q_len, kv_len, block_q, block_k)
    if kv_mask is None:
        return BlockMask(jnp.asarray(kv_lists)[None, None], jnp.asarray(q_lists)[None, None],
                         block_q, block_k, is_contiguous(kv_lists), is_contiguous(q_lists))
    kb_any, kb_all = kv_block_states(kv_mask, kv_len, block_k)  # [B, nk]
    cand = kv_lists[:, HEADER:]  # [nq, K]: key block ids
    kv = restrict(kv_lists, None, None, kb_any[:, cand], kb_all[:, cand])
    qt = restrict(q_lists, kb_any, kb_all, None, None)
    return BlockMask(kv[:, None], qt[:, None], block_q, block_k)


def from_states(listed, full, block_q: int, block_k: int, kv_len: int,
                kv_mask=None) -> BlockMask:
    """The block mask from (possibly traced) states [H', nq, nk] (H' = 1 or heads), narrowed
    by kv_mask."""
    listed = jnp.asarray(listed)
    full = jnp.asarray(full) & listed
    if kv_mask is not None:
        kb_any, kb_all = kv_block_states(kv_mask, kv_len, block_k)  # [B, nk]
        listed = listed[None] & kb_any[:, None, None, :]
        full = full[None] & kb_all[:, None, None, :]
    else:
        listed, full = listed[None], full[None]
    swap = lambda x: jnp.swapaxes(x, -1, -2)
    kv = lists_from_states(listed, full, xp=jnp)
    qt = lists_from_states(swap(listed), swap(full), xp=jnp)
    return BlockMask(kv, qt, block_q, block_k)


def bigbird_states(q_len: int, kv_len: int, block_q: int, block_k: int, *, block_size: int,
                   num_window_blocks: int, num_global_blocks: int, random_layout,
                   causal: bool = False):
    """(listed, full) jnp bool [H, nq, nk] for bigbird; random_layout may be traced.

    random_layout: int [H, >= num_blocks, r] (attention/bigbird.py's buffer; entries outside
    [0, num_blocks) point nowhere), num_blocks = ceil(max(q_len, kv_len) / block_size). Needs
    block_size % block_q == 0 and block_size % block_k == 0, so every kernel tile lies in one
    bigbird block and the pattern keeps or drops it whole; causality and the key length still
    make tiles partial (taken from the static rule).
    """
    if block_size % block_q or block_size % block_k:
        raise ValueError(
            f"bigbird pallas: kernel tiles (block_q={block_q}, block_k={block_k}) must divide "
            f"block_size={block_size}")
    num_blocks = _cdiv(max(q_len, kv_len), block_size)
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    qb = (np.arange(nq) * block_q // block_size)[:, None]
    kb = (np.arange(nk) * block_k // block_size)[None, :]
    layout = jnp.asarray(random_layout)[:, :num_blocks].astype(jnp.int32)

    def per_head(lay):
        return patterns.bigbird_blocks(
            qb, kb, num_blocks=num_blocks, num_window_blocks=num_window_blocks,
            num_global_blocks=num_global_blocks, random_layout=lay)

    kept = jax.vmap(per_head)(layout)  # [H, nq, nk]
    listed, full = block_states(Rule(None, (), causal), q_len, kv_len, block_q, block_k)
    return kept & listed, kept & full
