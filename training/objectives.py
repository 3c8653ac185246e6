"""What the loop trains: an objective maps (model, batch) to per-example sums.

    objective = objectives.get(config.train.objective, config)
    out = objective(model, batch, train=True, rngs=rngs)
    # out["loss_sum"] [B]: summed loss over the example's predicted targets
    # out["correct"]  [B]: number of those targets predicted right
    # out["count"]    [B]: number of predicted targets (1 for a classifier; tokens for a LM)

The loop divides sums by counts, so a training loss is a mean per target and an evaluation
pass weights every target once (batch["weight"] [B] zeroes the padding rows of an eval batch).

Objectives (train.objective):
- classify: one label per example, cross-entropy of the pooled logits (every LRA task).
- denoise: self-pretraining (Amos et al., ICLR 2024, "Never Train from Scratch"): a share
  train.mask_rate of the real input tokens (each independently; pair tasks: both sides) have
  their embedding replaced by a learned mask vector, and a per-token head predicts the original
  tokens there from the rest, with bidirectional attention. Only masked positions are scored.
- causal_lm: next-token prediction with causal attention: the logits at position t predict
  token t + 1 (both real). On the `lm` task this is byte-level language modelling; on an LRA
  task it is causal self-pretraining on the task's own inputs.
`model_spec(objective)` says which model the loop builds (head and causality); `check_task`
refuses combinations that cannot work, before anything is built.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

DEFAULT_MASK_RATE = 0.5  # Amos et al. report 50% masking for their LRA self-pretraining runs


def classify(model, batch, *, train: bool, rngs=None) -> dict:
    """One label per example (every LRA task): cross-entropy of the pooled logits."""
    logits = model(batch["inputs"], batch["mask"], train=train, rngs=rngs)  # [B, classes]
    labels = batch["label"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": losses, "correct": correct, "count": jnp.ones_like(losses)}


def _per_example(x):
    """[B, ...] -> [B]: sum over every axis but the first."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _token_sums(logits, targets, weight) -> dict:
    """logits [B, ..., V], targets int [B, ...], weight bool [B, ...] -> per-example sums."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w = weight.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {"loss_sum": _per_example(losses * w), "correct": _per_example(correct * w),
            "count": _per_example(w)}


def mask_positions(key, mask, rate: float):
    """bool like mask: each real token chosen independently with probability `rate`."""
    return (jax.random.uniform(key, mask.shape) < rate) & mask


def _eval_key(inputs):
    """Evaluation has no rngs: a key from the batch's own tokens, so a pass is repeatable."""
    flat = inputs.reshape(inputs.shape[0], -1).astype(jnp.uint32)
    weights = jnp.arange(flat.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
    code = jnp.sum(flat * weights)
    return jax.random.fold_in(jax.random.key(0), code)


def denoise(model, batch, *, train: bool, rngs=None, mask_rate: float = DEFAULT_MASK_RATE
            ) -> dict:
    """Masked-token prediction on the example's own inputs ([B, T] or pairs [B, 2, T])."""
    inputs, mask = batch["inputs"], batch["mask"]
    key = rngs.dropout() if (train and rngs is not None) else _eval_key(inputs)
    replace = mask_positions(key, mask, mask_rate)
    logits = model(inputs, mask, train=train, rngs=rngs, replace=replace)  # [..., T, V]
    return _token_sums(logits, inputs, replace)


def causal_lm(model, batch, *, train: bool, rngs=None) -> dict:
    """Next-token prediction: logits at t (causal model) scored against token t + 1."""
    inputs, mask = batch["inputs"], batch["mask"]
    logits = model(inputs, mask, train=train, rngs=rngs)                   # [..., T, V]
    weight = mask[..., :-1] & mask[..., 1:]
    return _token_sums(logits[..., :-1, :], inputs[..., 1:], weight)


OBJECTIVES: dict[str, Callable[..., dict]] = {
    "classify": classify, "denoise": denoise, "causal_lm": causal_lm}

# objective -> the model the loop builds: head ("classifier" | "tokens") and causal attention.
MODEL_SPECS = {"classify": {"head": "classifier", "causal": False},
               "denoise": {"head": "tokens", "causal": False},
               "causal_lm": {"head": "tokens", "causal": True}}


def get(name: str, config=None) -> Callable[..., dict]:
    """The objective named `name`, with its options from config.train (mask_rate) bound."""
    try:
        fn = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"train.objective must be one of {sorted(OBJECTIVES)}; got "
                         f"{name!r}") from None
    if name == "denoise" and config is not None:
        fn = functools.partial(denoise, mask_rate=float(
            config.train.get("mask_rate", DEFAULT_MASK_RATE)))
    return fn


def model_spec(name: str) -> dict:
    """-> {"head": ..., "causal": ...}: keyword arguments of models.build_model."""
    get(name)
    return dict(MODEL_SPECS[name])


def check_task(name: str, task, attention_name: str) -> None:
    """ValueError for an objective that cannot run on `task` with this attention variant."""
    import attention

    get(name)
    if getattr(task, "causal", False) and name != "causal_lm":
        raise ValueError(f"task {task.name!r} is language modelling: train.objective must be "
                         f"'causal_lm'; got {name!r}")
    if name == "causal_lm" or getattr(task, "causal", False):
        if not attention.get(attention_name).supports_causal:
            causal = [n for n in attention.names() if attention.get(n).supports_causal]
            raise ValueError(
                f"task {task.name!r} with train.objective={name!r} needs causal attention, and "
                f"attention variant {attention_name!r} does not support causal attention; it "
                f"must support causal attention: use one of {', '.join(causal)}")
