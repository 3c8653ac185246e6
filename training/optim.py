"""Learning-rate schedules of the LRA setups and the optax optimizer."""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("rsqrt", "cosine", "constant")


def schedule(train) -> optax.Schedule:
    """rsqrt: lr * min(1, step / warmup) / sqrt(max(step, warmup)) (LRA's
    'constant * linear_warmup * rsqrt_decay'); cosine: linear warmup then cosine decay to 0 at
    train.steps (LRA's image/pathfinder); constant: linear warmup then constant."""
    base, warmup, steps = float(train.learning_rate), int(train.warmup_steps), int(train.steps)
    if train.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}; got {train.schedule!r}")
    if warmup < 0:
        raise ValueError(f"train.warmup_steps must be >= 0; got {warmup}")

    def warm(step):
        return jnp.minimum(1.0, step / warmup) if warmup > 0 else 1.0

    if train.schedule == "rsqrt":
        return lambda step: base * warm(step) / jnp.sqrt(jnp.maximum(step, max(warmup, 1)))
    if train.schedule == "cosine":
        def cosine(step):
            progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
            return base * warm(step) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return cosine
    return lambda step: base * warm(step)


def optimizer(train) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay scaled by the lr, as Flax's old optim.Adam did)."""
    lr = schedule(train)
    # The clip is always a link of the chain (identity when off), so the optimizer state has one
    # structure and a run may be resumed with a clip turned on (train.change_on_resume).
    clip = (optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0
            else optax.identity())
    return optax.chain(clip, optax.adamw(lr, b1=train.b1, b2=train.b2, eps=train.eps,
                                         weight_decay=train.weight_decay))
