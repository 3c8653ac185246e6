"""Fixed sparsity patterns as exact predicates keep(i, j) on query/key positions.

One definition per pattern, shared by the XLA variants (reference masks in tests, masking of
partial blocks), the Pallas block-sparse kernel (block lists and in-kernel masks) and the mask
pictures. Each predicate takes broadcastable integer arrays i (query position) and j (key
position) and returns a bool array; it works on jnp and np arrays alike and inside kernels.
Causality (j <= i) and padding (kv_mask) are applied on top by the caller.

Semantics:
  local        abs(i - j) <= window
  strided      (i - j) mod stride == 0
  sparse       local or strided (one softmax, each pair counted once)
  sparse_fixed same block of block_size, or j among the last `summary` positions of its block
  longformer   abs(i - j) <= window, or i or j < num_global
  bigbird      on blocks: |qb - kb| <= num_window_blocks // 2, or qb or kb global (first
               ceil(g/2), last floor(g/2) blocks), or kb in random_layout[qb]
  axial        grid rows x cols, row-major: same row (axis=1) or same column (axis=0)
  local2d      abs(row_i - row_j) <= window and abs(col_i - col_j) <= window
Grid patterns accept `num_prefix` leading non-grid tokens (e.g. a CLS token): they see and are
seen by every position.
"""

from __future__ import annotations

import numpy as np


def _abs(x):
    return abs(x)  # works for np, jnp and traced arrays


def local(i, j, *, window):
    return _abs(i - j) <= window


def strided(i, j, *, stride):
    return (i - j) % stride == 0


def sparse(i, j, *, window, stride):
    return local(i, j, window=window) | strided(i, j, stride=stride)


def sparse_fixed(i, j, *, block_size, summary):
    return (i // block_size == j // block_size) | (j % block_size >= block_size - summary)


def longformer(i, j, *, window, num_global):
    return local(i, j, window=window) | (i < num_global) | (j < num_global)


def bigbird_global_blocks(num_blocks: int, num_global_blocks: int) -> tuple[int, int]:
    """(first, last): blocks [0, first) and [num_blocks - last, num_blocks) are global."""
    first = -(-num_global_blocks // 2)
    last = num_global_blocks // 2
    return first, last


def bigbird_blocks(qb, kb, *, num_blocks, num_window_blocks, num_global_blocks, random_layout):
    """Block-level bigbird predicate. random_layout: int [num_blocks, num_random_blocks]."""
    first, last = bigbird_global_blocks(num_blocks, num_global_blocks)
    window = _abs(qb - kb) <= num_window_blocks // 2
    is_global = (qb < first) | (kb < first) | (qb >= num_blocks - last) | (kb >= num_blocks - last)
    rnd = np.zeros((), bool)
    for r in range(random_layout.shape[1]):
        rnd = rnd | (random_layout[qb, r] == kb)
    return window | is_global | rnd


def bigbird(i, j, *, block_size, num_blocks, num_window_blocks, num_global_blocks,
            random_layout):
    return bigbird_blocks(
        i // block_size, j // block_size, num_blocks=num_blocks,
        num_window_blocks=num_window_blocks, num_global_blocks=num_global_blocks,
        random_layout=random_layout)


def _grid(i, j, num_prefix, cols):
    gi, gj = i - num_prefix, j - num_prefix
    prefix = (gi < 0) | (gj < 0)
    return prefix, gi // cols, gi % cols, gj // cols, gj % cols


def axial(i, j, *, shape, axis, num_prefix=0):
    prefix, ri, ci, rj, cj = _grid(i, j, num_prefix, shape[1])
    same = (ri == rj) if axis == 1 else (ci == cj)
    return prefix | same


def local2d(i, j, *, shape, window, num_prefix=0):
    prefix, ri, ci, rj, cj = _grid(i, j, num_prefix, shape[1])
    return prefix | ((_abs(ri - rj) <= window) & (_abs(ci - cj) <= window))


def dense_mask(pattern, q_len: int, kv_len: int, *, causal=False, **hparams) -> np.ndarray:
    """The pattern as a dense bool [q_len, kv_len] numpy array (tests and pictures only)."""
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    m = np.asarray(pattern(i, j, **hparams), bool)
    m = np.broadcast_to(m, (q_len, kv_len)).copy()
    if causal:
        m &= j <= i
    return m
