"""Redraw policies for random state (Performer's features, Reformer's LSH rotations).

redraw="fixed": drawn once by init_state and kept for the whole run.
redraw="step":  redrawn every `redraw_interval` training forward passes (calls of the layer in
training mode: one per training step, the dual encoder included, which encodes both documents
in one call), as the papers' reference code does (FAVOR+ feature redraw; Reformer: fresh
rotations each pass). The draw is a pure function of (init key, number of training passes):
draw 0 is init_state's (from its key), draw i >= 1 (after i * interval passes) uses
fold_in(key, i), so a run is deterministic in (seed, step) and resumes exactly from a
checkpoint (the counter and the init key are buffers, saved with the model).

Buffers added with "step": redraw_key uint32 [2] (the init key's data) and redraw_count int32 []
(training passes seen). Both are integers: never trained, always finite. Evaluation uses the
latest draw (no update outside training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POLICIES = ("fixed", "step")   # declared as Choice("fixed", options=POLICIES)


def draw_key(key, index):
    """The key of draw number `index` >= 1 (draw 0 is init_state's, from `key` itself)."""
    return jax.random.fold_in(key, index)


def buffers(key, redraw: str) -> dict:
    """The policy's extra buffers ({} for "fixed"); key: init_state's key."""
    if redraw == "fixed":
        return {}
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {"redraw_key": jnp.asarray(key, jnp.uint32),
            "redraw_count": jnp.zeros((), jnp.int32)}


def step(bufs, name: str, redraw_interval: int, draw):
    """One training pass: counter + 1; on a multiple of redraw_interval, bufs[name] =
    draw(key of draw number count // interval). -> new buffers (same dtypes and shapes)."""
    count = bufs["redraw_count"] + 1
    base = jax.random.wrap_key_data(bufs["redraw_key"])
    old = bufs[name]
    new = jax.lax.cond(count % redraw_interval == 0,
                       lambda: draw(draw_key(base, count // redraw_interval)).astype(old.dtype),
                       lambda: old)
    return {**bufs, name: new, "redraw_count": count.astype(jnp.int32)}
