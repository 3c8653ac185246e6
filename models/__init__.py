"""Flax NNX models for LRA. `build_model(config, task_spec, seed)` picks encoder or dual encoder."""

from __future__ import annotations

import jax
from flax import nnx

from models.attention import AttentionBuffer, MultiHeadAttention  # noqa: F401
from models.encoder import Classifier, DualEncoderClassifier, Encoder  # noqa: F401


def build_model(config, *, num_classes: int, vocab_size: int, max_len: int, pair: bool = False,
                grid_shape=None, seed: int = 0):
    """config: the run's ConfigDict (model and attention groups). Task facts come as arguments
    (models/ knows nothing of lra/)."""
    cls = DualEncoderClassifier if pair else Classifier
    return cls(num_classes=num_classes, vocab_size=vocab_size, max_len=max_len,
               model=config.model.to_dict(), attention_cfg=config.attention.to_dict(),
               grid_shape=grid_shape, rngs=nnx.Rngs(seed))


def count_params(model) -> int:
    """Number of trainable parameters (nnx.Param leaves)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
