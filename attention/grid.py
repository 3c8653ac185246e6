"""Attention on a rows x cols grid flattened row-major (images), with `num_prefix` global tokens.

  axial    Ho et al. 2019, Axial Attention: each position attends to its own row (axis=1) or
           its own column (axis=0); the model alternates the axis layer by layer. A reshape
           makes rows (or columns) the groups: O(n * cols) or O(n * rows), O(n^1.5) on a
           square grid.
  local2d  Parmar et al. 2018, Image Transformer (2D local): abs(row_i - row_j) <= window and
           abs(col_i - col_j) <= window. Query tiles of t x t cells (t = the power of two >=
           window, at least 8) attend to the (t + 2 window)^2 cells around them (each tile with
           a halo cut from its neighbours, no gather), the exact neighbourhood masked inside:
           O(n * (t + 2 window)^2), linear in the number of cells.
Prefix tokens (e.g. a CLS token, num_prefix of them before the grid) see every position and
are seen by every position: dense rows for them, shared keys for the grid queries.
Predicates: attention/patterns.py (axial, local2d).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention import Choice, Int, Shape, patterns, register
from attention._blocks import (
    dropout_keys, heads_first, kv_mask_or_ones, merge, pair_mask, partial_attention, round_up,
    to_blocks, xp)
from attention._util import check_causal, check_qkv


def _check_grid(name: str, shape, num_prefix, q, k):
    if shape is None:
        raise ValueError(f"{name}: shape (rows, cols) is required (a model supplies its task's "
                         f"grid)")
    n = num_prefix + shape[0] * shape[1]
    if q.shape[1] != n or k.shape[1] != n:
        raise ValueError(
            f"{name}: shape {tuple(shape)} with num_prefix={num_prefix} needs q_len == kv_len "
            f"== {num_prefix} + {shape[0]} * {shape[1]} = {n}; got q_len={q.shape[1]}, "
            f"kv_len={k.shape[1]}")
    return int(shape[0]), int(shape[1])


def _prepare(name, q, k, v, kv_mask, causal, shape, num_prefix):
    check_qkv(name, q, k, v, kv_mask)
    check_causal(name, causal, True, q.shape[1], k.shape[1])
    rows, cols = _check_grid(name, shape, num_prefix, q, k)
    kvm = kv_mask_or_ones(kv_mask, k.shape[0], k.shape[1])
    return heads_first(q), heads_first(k), heads_first(v), kvm, rows, cols


def _with_prefix(grid_out, qh, kh, vh, kvm, keep, num_prefix, causal, dropout_rate, rng):
    """Prepends the prefix tokens' outputs (dense rows: they see every key)."""
    if num_prefix == 0:
        return grid_out
    mask = pair_mask(keep, np.arange(num_prefix)[None], np.arange(kh.shape[2]), kvm, causal)
    rows = partial_attention(qh[:, :, None, :num_prefix], [(kh, vh, mask)],
                             dropout_rate=dropout_rate, dropout_rng=rng)
    return jnp.concatenate([merge(rows)[:, :, 0], grid_out], axis=2)


def _prefix_group(kh, vh, kvm, keep, pos_q, num_prefix, causal):
    """Grid queries' extra key group: the prefix tokens (shared by all groups)."""
    return (kh[:, :, :num_prefix], vh[:, :, :num_prefix],
            pair_mask(keep, pos_q, np.arange(num_prefix), kvm[:, :num_prefix], causal))


@register("axial", supports_causal=True, complexity="O(n sqrt n)", supports_dropout=True,
          hparams={"shape": Shape((32, 32)), "axis": Choice(1, options=(0, 1)),
                   "num_prefix": Int(0, min=0)},
          model_supplies={"shape": "grid_shape", "num_prefix": "num_prefix",
                          "axis": "layer_parity"},
          doc="Axial attention: same row (axis=1) or same column (axis=0) of a rows x cols grid "
              "(Ho et al. 2019)")
def axial_attention(q, k, v, *, kv_mask=None, causal=False, shape, axis, num_prefix,
                    dropout_rate=0.0, dropout_rng=None):
    """q, k, v: [B, num_prefix + rows * cols, H, D]; kv_mask: bool [B, T]. -> [B, T, H, Dv].
    axis: 0 same column, 1 same row."""
    qh, kh, vh, kvm, rows, cols = _prepare("axial", q, k, v, kv_mask, causal, shape, num_prefix)
    p = num_prefix
    keep = lambda i, j: patterns.axial(i, j, shape=(rows, cols), axis=axis,  # noqa: E731
                                       num_prefix=p)
    keys = dropout_keys(dropout_rate, dropout_rng, 2)

    def lines(x, seq_axis):  # [.., p + R*C, ..] -> [.., lines, cells per line, ..]
        x = x[(slice(None),) * seq_axis + (slice(p, None),)]
        x = x.reshape(*x.shape[:seq_axis], rows, cols, *x.shape[seq_axis + 1:])
        return x if axis == 1 else x.swapaxes(seq_axis, seq_axis + 1)

    pos = lines(np.arange(p + rows * cols), 0)  # [G, Q]
    kv = lines(kvm, 1)  # [B, G, Q]
    groups = [(lines(kh, 2), lines(vh, 2), pair_mask(keep, pos, pos, kv, causal))]
    if p:
        groups.append(_prefix_group(kh, vh, kvm, keep, pos, p, causal))
    out = merge(partial_attention(lines(qh, 2), groups, dropout_rate=dropout_rate,
                                  dropout_rng=keys[0]))  # [B, H, G, Q, Dv]
    if axis == 0:
        out = jnp.swapaxes(out, 2, 3)
    out = out.reshape(*out.shape[:2], rows * cols, out.shape[-1])
    out = _with_prefix(out, qh, kh, vh, kvm, keep, p, causal, dropout_rate, keys[1])
    return heads_first(out).astype(v.dtype)


def tile_size(window: int) -> int:
    """Side t of the square query tiles of local2d: the power of two >= window, at least 8."""
    t = 8
    while t < window:
        t *= 2
    return t


def _grid_tiles(x, axis: int, t: int):
    """[.., Rp, Cp, ..] (grid at axis, axis + 1; multiples of t) -> [.., nR * nC, t * t, ..]."""
    s = x.shape
    x = x.reshape(*s[:axis], s[axis] // t, t, s[axis + 1] // t, t, *s[axis + 2:])
    x = x.swapaxes(axis + 1, axis + 2)  # [.., nR, nC, t, t, ..]
    return x.reshape(*s[:axis], (s[axis] // t) * (s[axis + 1] // t), t * t, *s[axis + 2:])


def _untile(x, axis: int, t: int, n_rows: int, n_cols: int):
    """Inverse of _grid_tiles: [.., nR * nC, t * t, ..] -> [.., nR * t, nC * t, ..]."""
    s = x.shape
    x = x.reshape(*s[:axis], n_rows, n_cols, t, t, *s[axis + 2:])
    x = x.swapaxes(axis + 1, axis + 2)
    return x.reshape(*s[:axis], n_rows * t, n_cols * t, *s[axis + 2:])


def _halo(x, axis: int, t: int, w: int, fill):
    """[.., count * t, ..] -> [.., count, t + 2w, ..]: each block of t with w cells each side.

    w <= t, so the halo is the tail of the previous block and the head of the next (three
    slices, no gather); cells outside the axis are `fill`.
    """
    xb = to_blocks(x, t, axis)  # [.., count, t, ..]
    if w == 0:
        return xb
    count = xb.shape[axis]
    widths = [(0, 0)] * xb.ndim
    widths[axis] = (1, 1)
    padded = xp(xb).pad(xb, widths, constant_values=fill)

    def part(blocks: slice, cells: slice):
        idx = [slice(None)] * xb.ndim
        idx[axis], idx[axis + 1] = blocks, cells
        return padded[tuple(idx)]

    prev = part(slice(0, count), slice(t - w, t))
    after = part(slice(2, count + 2), slice(0, w))
    return xp(xb).concatenate([prev, xb, after], axis=axis + 1)


def _grid_windows(x, axis: int, t: int, w: int, fill):
    """Cells within `w` of each t x t tile: the overlapping (t + 2w)^2 windows.

    x: [.., nR * t, nC * t, ..] (grid at axis, axis + 1) -> [.., nR * nC, (t + 2w)^2, ..].
    """
    x = _halo(x, axis, t, w, fill)  # [.., nR, span, Cp, ..]
    x = _halo(x, axis + 2, t, w, fill)  # [.., nR, span, nC, span, ..]
    x = x.swapaxes(axis + 1, axis + 2)  # [.., nR, nC, span, span, ..]
    s = x.shape
    return x.reshape(*s[:axis], s[axis] * s[axis + 1], s[axis + 2] * s[axis + 3],
                     *s[axis + 4:])


@register("local2d", supports_causal=True, complexity="O(n)", supports_dropout=True,
          hparams={"shape": Shape((32, 32)), "window": Int(3, min=0), "num_prefix": Int(0, min=0)},
          model_supplies={"shape": "grid_shape", "num_prefix": "num_prefix"},
          doc="2D local attention: abs(row_i - row_j) <= window and abs(col_i - col_j) <= window "
              "on a rows x cols grid (Parmar et al. 2018)")
def local2d_attention(q, k, v, *, kv_mask=None, causal=False, shape, window, num_prefix,
                      dropout_rate=0.0, dropout_rng=None):
    """q, k, v: [B, num_prefix + rows * cols, H, D]; kv_mask: bool [B, T]. -> [B, T, H, Dv]."""
    qh, kh, vh, kvm, rows, cols = _prepare("local2d", q, k, v, kv_mask, causal, shape,
                                           num_prefix)
    p, w = num_prefix, window
    keep = lambda i, j: patterns.local2d(i, j, shape=(rows, cols), window=w,  # noqa: E731
                                         num_prefix=p)
    keys = dropout_keys(dropout_rate, dropout_rng, 2)
    t = tile_size(w)
    r_pad, c_pad = round_up(rows, t), round_up(cols, t)
    n_rows, n_cols = r_pad // t, c_pad // t

    def grid(x, seq_axis):  # [.., p + R*C, ..] -> [.., R, C, ..]
        x = x[(slice(None),) * seq_axis + (slice(p, None),)]
        return x.reshape(*x.shape[:seq_axis], rows, cols, *x.shape[seq_axis + 1:])

    def padded(x, axis, fill):  # grid axes padded to whole tiles
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, r_pad - rows)
        widths[axis + 1] = (0, c_pad - cols)
        return xp(x).pad(x, widths, constant_values=fill)

    def queries(x, axis, fill=0):  # grid -> tiles [.., G, t*t, ..]
        return _grid_tiles(padded(x, axis, fill), axis, t)

    def neighbourhood(x, axis, fill=0):  # grid -> windows [.., G, (t+2w)^2, ..]
        return _grid_windows(padded(x, axis, fill), axis, t, w, fill)

    pos = grid(np.arange(p + rows * cols), 0)  # [R, C]
    pos_q = queries(pos, 0, -1)  # [G, t*t]
    pos_k = neighbourhood(pos, 0, -1)  # [G, (t+2w)^2]
    kv = neighbourhood(grid(kvm, 1), 1, False)  # [B, G, (t+2w)^2]
    in_grid = lambda i, j: keep(i, j) & (j >= p)  # noqa: E731  (padding cells are -1)
    groups = [(neighbourhood(grid(kh, 2), 2), neighbourhood(grid(vh, 2), 2),
               pair_mask(in_grid, pos_q, pos_k, kv, causal))]
    if p:
        groups.append(_prefix_group(kh, vh, kvm, keep, pos_q, p, causal))
    out = merge(partial_attention(queries(grid(qh, 2), 2), groups, dropout_rate=dropout_rate,
                                  dropout_rng=keys[0]))  # [B, H, G, t*t, Dv]
    out = _untile(out, 2, t, n_rows, n_cols)[:, :, :rows, :cols]
    out = out.reshape(*out.shape[:2], rows * cols, out.shape[-1])
    out = _with_prefix(out, qh, kh, vh, kvm, keep, p, causal, dropout_rate, keys[1])
    return heads_first(out).astype(v.dtype)
