"""Flax NNX models for LRA. `build_model(config, task_spec, seed)` picks encoder or dual encoder
(classification) or the per-token predictor (denoising, language modelling)."""

from __future__ import annotations

import jax
from flax import nnx

from models.multihead import AttentionBuffer, MultiHeadAttention  # noqa: F401
from models.settings import ModelSettings  # noqa: F401
from models.encoder import (Classifier, DualEncoderClassifier, Encoder,  # noqa: F401
                            TokenPredictor)
from models.recurrent import pop_aux_losses  # noqa: F401

HEADS = ("classifier", "tokens")


def build_model(config, *, num_classes: int, vocab_size: int, max_len: int, pair: bool = False,
                grid_shape=None, seed: int = 0, head: str = "classifier", causal: bool = False):
    """config: the run's ConfigDict (model and attention groups). Task facts come as arguments
    (models/ knows nothing of lra/). head: "classifier" (pooled -> classes; a dual encoder when
    pair) or "tokens" (per-token logits over the vocabulary); causal: causal attention in every
    layer (a variant that cannot be causal is a ValueError naming it)."""
    common = dict(vocab_size=vocab_size, max_len=max_len,
                  model=ModelSettings.of(config.model.to_dict()),
                  attention_cfg=config.attention.to_dict(), grid_shape=grid_shape,
                  rngs=nnx.Rngs(seed))
    if head == "tokens":
        return TokenPredictor(causal=causal, **common)
    if head != "classifier":
        raise ValueError(f"build_model: head must be one of {HEADS}; got {head!r}")
    cls = DualEncoderClassifier if pair else Classifier
    return cls(num_classes=num_classes, causal=causal, **common)


def count_params(model) -> int:
    """Number of trainable parameters (nnx.Param leaves)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
