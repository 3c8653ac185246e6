"""What the loop trains: an objective maps (model, batch) to per-example sums.

    objective = objectives.get(config.train.objective)
    out = objective(model, batch, train=True, rngs=rngs)
    # out["loss_sum"] [B]: summed loss over the example's predicted targets
    # out["correct"]  [B]: number of those targets predicted right
    # out["count"]    [B]: number of predicted targets (1 for a classifier; tokens for a LM)

The loop divides sums by counts, so a training loss is a mean per target and an evaluation
pass weights every target once (batch["weight"] [B] zeroes the padding rows of an eval batch).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax


def classify(model, batch, *, train: bool, rngs=None) -> dict:
    """One label per example (every LRA task): cross-entropy of the pooled logits."""
    logits = model(batch["inputs"], batch["mask"], train=train, rngs=rngs)  # [B, classes]
    labels = batch["label"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": losses, "correct": correct, "count": jnp.ones_like(losses)}


OBJECTIVES: dict[str, Callable[..., dict]] = {"classify": classify}


def get(name: str) -> Callable[..., dict]:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"train.objective must be one of {sorted(OBJECTIVES)}; got "
                         f"{name!r}") from None
