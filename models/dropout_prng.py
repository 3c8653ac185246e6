"""The dropout masks' random bits: Philox2x32-10 (Salmon et al. 2011, "Parallel random numbers:
as easy as 1, 2, 3") written with elementwise uint32 operations, as a JAX PRNG implementation
(`IMPL`, for `jax.random.wrap_key_data(..., impl=IMPL)`; models/encoder.dropout_rngs).

Why not JAX's default threefry: on the CPU JAX lowers threefry as a rolled loop, and XLA gave
the loop's two uint32 carries of the mask's shape a temporary slot of their own for every call,
never reused, so the compiled temporary memory grew by 8 bytes per element of every dropout
in the program (under remat/reversible, almost all of what still grew with depth). JAX's own
"philox2x32" lowers without a loop but its 32 x 32 -> 64-bit multiply failed to compile for
sharded arrays (jax 0.10.2, CPU); here the multiply is four 16-bit products, so the bits are an
elementwise function of (key, position): no loop, shardable.

Key: two uint32 words (k, c1). Bits of element i (flat index) = word 0 of
Philox2x32-10(counter = (i, c1), key = k). split and fold_in derive keys with JAX's threefry on
the (tiny) key arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl

M = np.uint32(0xD256D193)        # Philox2x32 multiplier
W = np.uint32(0x9E3779B9)        # Weyl key increment
ROUNDS = 10


def _mulhilo(x):
    """(high, low) 32-bit halves of the 64-bit product M * x, from 16-bit pieces."""
    lo16 = np.uint32(0xFFFF)
    xl, xh = x & lo16, x >> 16
    ml, mh = M & lo16, M >> np.uint32(16)
    ll, hl, lh, hh = xl * ml, xh * ml, xl * mh, xh * mh
    cross = (ll >> 16) + (hl & lo16) + (lh & lo16)
    return hh + (hl >> 16) + (lh >> 16) + (cross >> 16), x * M


def philox2x32(c0, c1, key):
    """Philox2x32-10 of counters (c0, c1) under `key` (uint32 arrays, broadcast)."""
    c0, c1, key = (jnp.asarray(a, jnp.uint32) for a in (c0, c1, key))
    for r in range(ROUNDS):
        if r:
            key = key + W
        hi, lo = _mulhilo(c0)
        c0, c1 = hi ^ key ^ c1, lo
    return c0, c1


def _as_threefry(key):
    return jax.random.wrap_key_data(key, impl="threefry2x32")


def _seed(seed):
    seed = jnp.asarray(seed)
    high = (seed >> 32).astype(jnp.uint32) if seed.dtype.itemsize == 8 \
        else jnp.zeros((), jnp.uint32)
    return jnp.stack([high, seed.astype(jnp.uint32)])


def _split(key, shape):
    return jax.random.key_data(jax.random.split(_as_threefry(key), shape))


def _fold_in(key, data):
    return jax.random.key_data(jax.random.fold_in(_as_threefry(key), data))


def _random_bits(key, bit_width, shape):
    n = math.prod(shape)
    counter = jax.lax.iota(jnp.uint32, n)
    word, other = philox2x32(counter, key[1], key[0])
    if bit_width == 64:
        bits = (word.astype(jnp.uint64) << 32) | other.astype(jnp.uint64)
    else:
        bits = (word >> (32 - bit_width)).astype(f"uint{bit_width}")
    return bits.reshape(shape)


IMPL = define_prng_impl(key_shape=(2,), seed=_seed, split=_split, random_bits=_random_bits,
                        fold_in=_fold_in, name="philox2x32_elementwise", tag="pxe")
