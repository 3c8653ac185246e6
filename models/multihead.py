"""Multi-head self-attention layer: q/k/v/o projections around any registered variant.

The variant's `init_state` arrays become NNX variables of this layer: its params are nnx.Param
(trained by the optimizer), its buffers are AttentionBuffer (not trained; a variant with
`update_buffers`, e.g. routing's centroids, updates them in training mode).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import attention
from attention import context_parallel


class AttentionBuffer(nnx.Variable):
    """A variant's non-trainable array (random features, rotations, layouts, centroids)."""


def layer_hparams(name: str, overrides: Mapping[str, Any], *, layer_index: int,
                  grid_shape=None, num_prefix: int = 0) -> dict:
    """The variant's hyperparameters for one layer: defaults, config values, and what its
    registry record asks the model to supply (Variant.model_supplies), checked together."""
    hp = attention.hparams_for(name, overrides)
    facts = {"grid_shape": None if grid_shape is None else tuple(int(s) for s in grid_shape),
             "num_prefix": num_prefix, "layer_parity": layer_index % 2}
    for key, fact in attention.get(name).model_supplies.items():
        if facts[fact] is None:
            raise ValueError(
                f"attention variant {name!r} needs a 2D grid (hyperparameter {key!r}), but the "
                f"task has none; use it on image-like tasks (image, pathfinder, pathx)")
        hp[key] = facts[fact]
    return attention.hparams_for(name, hp)


class MultiHeadAttention(nnx.Module):
    def __init__(self, *, emb_dim: int, qkv_dim: int, num_heads: int, attention_name: str,
                 hparams: Mapping[str, Any], impl: str, max_len: int, dropout_rate: float,
                 dtype=jnp.float32, causal: bool = False, rngs: nnx.Rngs):
        if qkv_dim % num_heads:
            raise ValueError(f"model.qkv_dim ({qkv_dim}) must be divisible by model.num_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.head_dim = qkv_dim // num_heads
        self.attention_name = attention_name
        self.hparams = dict(hparams)
        self.dropout_rate = dropout_rate
        self.variant = attention.get(attention_name)
        if causal and not self.variant.supports_causal:
            raise ValueError(
                f"attention variant {attention_name!r} does not support causal attention (a "
                f"causal model needs one that does: "
                f"{', '.join(n for n in attention.names() if attention.get(n).supports_causal)})")
        self.causal = causal
        self.impl = attention.resolve_impl(attention_name, impl)  # "auto" decided here
        self.attention_fn = attention.implementation(attention_name, self.impl)
        if dropout_rate > 0 and not self.variant.supports_dropout:
            warnings.warn(f"attention variant {attention_name!r} has no dropout on attention "
                          f"weights; attention_dropout_rate={dropout_rate} is not applied",
                          stacklevel=2)
        linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, rngs=rngs)  # noqa: E731
        self.query = linear(emb_dim, qkv_dim)
        self.key = linear(emb_dim, qkv_dim)
        self.value = linear(emb_dim, qkv_dim)
        self.out = linear(qkv_dim, emb_dim)
        state = self.variant.init_state(
            rngs.params(), q_len=max_len, kv_len=max_len, num_heads=num_heads,
            head_dim=self.head_dim, **self.hparams)
        self.param_names = tuple(sorted(state["params"]))
        self.buffer_names = tuple(sorted(state["buffers"]))
        for n in self.param_names:
            setattr(self, f"param_{n}", nnx.Param(jnp.asarray(state["params"][n])))
        for n in self.buffer_names:
            setattr(self, f"buffer_{n}", AttentionBuffer(jnp.asarray(state["buffers"][n])))

    def __call__(self, x, mask, *, train: bool = False, rngs: nnx.Rngs | None = None):
        """x: [B, T, emb]; mask: bool [B, T] (True = real token). -> [B, T, emb]."""
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))  # [B, T, H, D]
        kwargs = dict(self.hparams)
        kwargs.update({n: getattr(self, f"param_{n}")[...] for n in self.param_names})
        buffers = {n: getattr(self, f"buffer_{n}")[...] for n in self.buffer_names}
        kwargs.update(buffers)
        if train and self.dropout_rate > 0 and self.variant.supports_dropout and rngs is not None:
            kwargs.update(dropout_rate=self.dropout_rate, dropout_rng=rngs.dropout())
        if context_parallel.seq_shards() > 1:  # the length split over the mesh's "seq" axis
            y = context_parallel.attend(self.attention_name, q, k, v, kv_mask=mask,
                                        causal=self.causal, impl=self.impl, **kwargs)
        else:
            y = self.attention_fn(q, k, v, kv_mask=mask, causal=self.causal, **kwargs)
        if train and self.variant.update_buffers is not None:
            new = self.variant.update_buffers(
                buffers, jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), kv_mask=mask,
                **self.hparams)
            for n, value in new.items():
                getattr(self, f"buffer_{n}")[...] = value
        return self.out(y.reshape(b, t, -1))
