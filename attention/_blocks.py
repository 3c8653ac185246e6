"""Block and gather machinery for the fixed-pattern variants: no n x n score tensor anywhere.

Inside a variant, arrays are head-major: x [B, H, N, D] (`heads_first`), and a pattern
arranges the queries in groups (blocks of the sequence, residue classes, grid tiles):
q [B, H, G, Q, D]. Each group attends to a few key sets, either per group
(k [B, H, G, K, D]: neighbouring blocks, gathered random blocks) or shared by all groups
(k [B, H, K, D]: global tokens, summary positions). `partial_attention` computes the softmax
statistics of one arrangement (max m, sum l and unnormalised output o, all float32) over the
union of its key sets; `merge` combines the statistics of arrangements that cover disjoint
sets of (i, j) pairs, so a pattern that is a union (local + strided, band + global) is one
exact softmax with each pair counted once:

    m = max_a m_a,   l = sum_a l_a exp(m_a - m),   out = sum_a o_a exp(m_a - m) / l.

The masks come from the exact predicates in attention/patterns.py, evaluated on the positions
of the gathered keys (the same reshapes applied to the positions), so partial blocks, padding
and causality are exact. Positions are static: the reshapes run in numpy at trace time, and a
pattern mask up to STATIC_MASK_LIMIT elements becomes a constant of the program (fewer ops to
compile); a larger one is computed by XLA from the (linear-size) position arrays. The maxima are constants for differentiation (the softmax does not
depend on them), so gradients are those of the exact softmax.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention._util import NEG_INF

STATIC_MASK_LIMIT = 2**20  # elements of a pattern mask folded to a constant at trace time


def xp(x):
    """The array module of x: numpy for static (trace-time) arrays, else jax.numpy."""
    return np if isinstance(x, np.ndarray) else jnp


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x, axis: int, length: int, value=0):
    """x padded at the end of `axis` to `length` with `value`."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return xp(x).pad(x, widths, constant_values=value)


def kv_mask_or_ones(kv_mask, batch: int, kv_len: int):
    """bool [B, Tk]: the given mask, or all True."""
    if kv_mask is None:
        return jnp.ones((batch, kv_len), bool)
    return kv_mask.astype(bool)


def heads_first(x):
    """[B, T, H, D] -> [B, H, T, D]."""
    return jnp.swapaxes(x, 1, 2)


def to_blocks(x, block: int, axis: int):
    """Splits `axis` (length % block == 0) into [length // block, block]."""
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1:])


def merge_axes(x, axis: int):
    """Merges axes `axis` and `axis + 1`: the inverse of to_blocks."""
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2:])


def neighbours(xb, before: int, after: int, axis: int, fill=0):
    """Blocks qb - before .. qb + after of each block qb, side by side.

    xb: [..., nb, c, ...] with the block index at `axis` -> [..., nb, S * c, ...],
    S = before + 1 + after; blocks outside [0, nb) are `fill`. Built from shifted slices (no
    gather), so its gradient is a sum of pads.
    """
    nb = xb.shape[axis]
    widths = [(0, 0)] * xb.ndim
    widths[axis] = (before, after)
    padded = xp(xb).pad(xb, widths, constant_values=fill)
    index = [slice(None)] * xb.ndim
    shifted = []
    for s in range(before + 1 + after):
        index[axis] = slice(s, s + nb)
        shifted.append(padded[tuple(index)])
    return merge_axes(xp(xb).stack(shifted, axis=axis + 1), axis + 1)


def gather_blocks(xb, index):
    """Per-head gather of whole blocks.

    xb: [B, H, nb, c, D]; index: int [H, G, r] (block ids in [0, nb)) -> [B, H, G, r * c, D].
    """
    heads = jnp.arange(xb.shape[1])[:, None, None]
    g = xb[:, heads, index]  # [B, H, G, r, c, D]
    return merge_axes(g, 3)


class Partial(NamedTuple):
    """Softmax statistics over a subset of key positions, per query.

    o: [B, H, G, Q, Dv] float32, unnormalised (sum_j p_ij v_j); m, l: [B, H, G, Q] float32.
    """

    o: jax.Array
    m: jax.Array
    l: jax.Array

    def map(self, fn) -> "Partial":
        """The same layout change on o, m, l (fn acts on the leading [B, H, G, Q] axes)."""
        return Partial(fn(self.o), fn(self.m), fn(self.l))


def _logits(q, k, scale):
    # q [B, H, G, Q, D]; k [B, H, G, K, D] or shared [B, H, K, D] -> [B, H, G, Q, K] f32
    spec = "bhgqd,bhgkd->bhgqk" if k.ndim == 5 else "bhgqd,bhkd->bhgqk"
    return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) * scale


def _values(p, v):
    # p [B, H, G, Q, K]; v [B, H, G, K, Dv] or [B, H, K, Dv] -> [B, H, G, Q, Dv] f32
    spec = "bhgqk,bhgkd->bhgqd" if v.ndim == 5 else "bhgqk,bhkd->bhgqd"
    return jnp.einsum(spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def partial_attention(q, groups: Sequence[tuple], *, dropout_rate: float = 0.0,
                      dropout_rng=None) -> Partial:
    """One softmax of q over the union of `groups`' keys; returns its statistics.

    q: [B, H, G, Q, D]. groups: (k, v, mask) with k, v [B, H, G, K, D] or [B, H, K, D] and
    mask bool broadcastable to [B, H, G, Q, K] (True = pair counted). Logits and statistics
    are float32 whatever the input dtype. Dropout (rate, rng) drops normalised weights.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = [jnp.where(mask, _logits(q, k, scale), NEG_INF) for k, _, mask in groups]
    m = logits[0].max(axis=-1)
    for s in logits[1:]:
        m = jnp.maximum(m, s.max(axis=-1))
    m = jax.lax.stop_gradient(m)  # [B, H, G, Q]
    keep = None
    if dropout_rate > 0.0 and dropout_rng is not None:  # one draw for all groups' weights
        sizes = [s.shape[-1] for s in logits]
        shape = jnp.broadcast_shapes(*(s.shape[:-1] for s in logits)) + (sum(sizes),)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, shape)
        keep = jnp.split(keep, list(np.cumsum(sizes)[:-1]), axis=-1)
    o = l = 0.0
    for n, (s, (_, v, mask)) in enumerate(zip(logits, groups)):
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)  # [B, H, G, Q, K]
        l = l + p.sum(axis=-1)
        if keep is not None:
            p = jnp.where(keep[n], p / (1.0 - dropout_rate), 0.0)
        o = o + _values(p, v)
    return Partial(o, m, l)


def merge(*parts: Partial):
    """Normalised output of the union of disjoint partial softmaxes: o's shape, float32.

    A query with no visible key in any part (l == 0 everywhere) gets zeros.
    """
    m = parts[0].m
    for p in parts[1:]:
        m = jnp.maximum(m, p.m)
    o = l = 0.0
    for p in parts:
        w = jnp.exp(p.m - m)
        o = o + p.o * w[..., None]
        l = l + p.l * w
    return o / jnp.where(l == 0.0, 1.0, l)[..., None]


def dropout_keys(dropout_rate: float, dropout_rng, count: int):
    """`count` independent keys for the parts of one variant (None when dropout is off)."""
    if dropout_rate == 0.0 or dropout_rng is None:
        return [None] * count
    return list(jax.random.split(dropout_rng, count))


def pair_mask(keep, pos_q, pos_k, kv, causal: bool):
    """keep(i, j) & (j <= i if causal) & kv as bool [B, 1, G, Q, K].

    pos_q: int [G, Q]; pos_k: int [G, K], or [K] for keys shared by all groups (numpy arrays
    for static positions); kv: bool [B, G, K] or [B, K] (the kv_mask at those keys, False
    outside the sequence).
    """
    i = pos_q[:, :, None]
    j = pos_k[:, None, :] if pos_k.ndim == 2 else pos_k[None, None, :]
    if math.prod(np.broadcast_shapes(i.shape, j.shape)) > STATIC_MASK_LIMIT:
        i, j = jnp.asarray(i), jnp.asarray(j)  # computed by XLA, not a large constant
    m = keep(i, j)
    if causal:
        m = m & (j <= i)
    kv = kv[:, :, None, :] if kv.ndim == 3 else kv[:, None, None, :]  # [B, G|1, 1, K]
    return jnp.asarray(m)[None, None] & kv[:, None]
