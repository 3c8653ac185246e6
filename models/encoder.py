"""Transformer encoder for LRA classification (pre-LayerNorm blocks, any attention variant).

Classifier: tokens -> embedding + positions -> blocks -> LayerNorm -> pooling (a learned CLS
vector prepended, or the mean over real tokens) -> Dense(mlp) -> ReLU -> Dense(classes), the
head of the LRA code. DualEncoderClassifier (retrieval): one shared encoder for both documents,
[u, v, u*v, u-v] (or [u, v]) -> Dense(mlp) -> ReLU -> Dense(classes).
TokenPredictor (denoising and language modelling): the same encoder, its per-token states ->
Dense(vocab) at every position; for masked-token prediction the chosen positions' embeddings are
replaced by a learned mask vector. The head and the mask vector are the predictor's, the encoder
is shared with the classifiers, so a pretrained encoder loads into a classifier unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention.context_parallel import shard_sequence
from models.attention import MultiHeadAttention, layer_hparams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """[length, dim] fixed sin/cos position table (Vaswani et al., 2017)."""
    pos = np.arange(length)[:, None]
    div = np.exp(np.arange(0, dim, 2) * (-np.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(pos * div)
    table[:, 1::2] = np.cos(pos * div)[:, : dim // 2]
    return table


def sinusoidal_2d_positions(grid_shape, dim: int, num_prefix: int = 0) -> np.ndarray:
    """[num_prefix + rows * cols, dim] 2D table for raster-order pixels: the first half of the
    channels is the 1D table of the row, the second half that of the column, so a dot product of
    two positions is a function of the row offset plus one of the column offset. Prefix tokens
    (CLS) get zeros."""
    if dim % 4:
        raise ValueError(f"model.pos_embedding='sinusoidal2d' needs emb_dim divisible by 4; "
                         f"got {dim}")
    rows, cols = (int(s) for s in grid_shape)
    half = dim // 2
    row = np.repeat(sinusoidal_positions(rows, half), cols, axis=0)
    col = np.tile(sinusoidal_positions(cols, half), (rows, 1))
    table = np.concatenate([row, col], axis=1)
    return np.concatenate([np.zeros((num_prefix, dim), np.float32), table], axis=0)


POS_EMBEDDINGS = ("sinusoidal", "sinusoidal2d", "learned")


class EncoderBlock(nnx.Module):
    def __init__(self, *, emb_dim, mlp_dim, dropout_rate, attention_dropout_rate, dtype, rngs,
                 **attention_kwargs):
        self.norm1 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.attention = MultiHeadAttention(emb_dim=emb_dim, dtype=dtype, rngs=rngs,
                                            dropout_rate=attention_dropout_rate,
                                            **attention_kwargs)
        self.norm2 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x, mask, *, train, rngs):
        drop = lambda y: self.dropout(y, deterministic=not train, rngs=rngs)  # noqa: E731
        x = x + drop(self.attention(self.norm1(x), mask, train=train, rngs=rngs))
        y = self.mlp_out(drop(jax.nn.gelu(self.mlp_in(self.norm2(x)))))
        return x + drop(y)


class Encoder(nnx.Module):
    """tokens int [B, T], mask bool [B, T] -> pooled [B, emb_dim] (or per-token states).

    causal=True: every attention layer is causal (position i sees positions <= i); a variant
    that cannot be causal is a ValueError here, naming it."""

    def __init__(self, *, vocab_size: int, max_len: int, model: Mapping[str, Any],
                 attention_cfg: Mapping[str, Any], grid_shape=None, causal: bool = False,
                 rngs: nnx.Rngs):
        m = dict(model)
        self.dtype = DTYPES[m["dtype"]] if m["dtype"] in DTYPES else _bad("model.dtype", m["dtype"], DTYPES)
        if m["pooling"] not in ("cls", "mean"):
            _bad("model.pooling", m["pooling"], ("cls", "mean"))
        if m["pos_embedding"] not in POS_EMBEDDINGS:
            _bad("model.pos_embedding", m["pos_embedding"], POS_EMBEDDINGS)
        self.pooling = m["pooling"]
        prefix = 1 if self.pooling == "cls" else 0
        self.max_len = max_len
        total = max_len + prefix
        emb = m["emb_dim"]
        self.embed = nnx.Embed(vocab_size, emb, rngs=rngs)
        if m["pos_embedding"] == "learned":
            self.pos = nnx.Param(jax.random.normal(rngs.params(), (total, emb)) * 0.02)
        elif m["pos_embedding"] == "sinusoidal2d":
            if grid_shape is None or int(np.prod(grid_shape)) != max_len:
                raise ValueError(
                    "model.pos_embedding='sinusoidal2d' is for image-like tasks whose max_len is "
                    f"rows * cols of the task's grid; got grid_shape={grid_shape}, "
                    f"max_len={max_len}. Use 'sinusoidal' or 'learned' for sequences.")
            self.pos = nnx.Variable(jnp.asarray(sinusoidal_2d_positions(grid_shape, emb, prefix)))
        else:
            self.pos = nnx.Variable(jnp.asarray(sinusoidal_positions(total, emb)))
        if prefix:
            self.cls = nnx.Param(jax.random.normal(rngs.params(), (emb,)) * 0.02)
        self.dropout = nnx.Dropout(m["dropout_rate"])
        name = attention_cfg["name"]
        overrides = {k: v for k, v in attention_cfg.items() if k not in ("name", "impl")}
        self.blocks = nnx.List([
            EncoderBlock(
                emb_dim=emb, mlp_dim=m["mlp_dim"], dropout_rate=m["dropout_rate"],
                dtype=self.dtype, rngs=rngs, qkv_dim=m["qkv_dim"], num_heads=m["num_heads"],
                attention_name=name, impl=attention_cfg.get("impl", "xla"),
                hparams=layer_hparams(name, overrides, layer_index=i, grid_shape=grid_shape,
                                      num_prefix=prefix),
                max_len=total, attention_dropout_rate=m["attention_dropout_rate"],
                causal=causal)
            for i in range(m["num_layers"])])
        self.norm = nnx.LayerNorm(emb, dtype=self.dtype, rngs=rngs)

    def __call__(self, tokens, mask, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x, mask = self.states(tokens, mask, train=train, rngs=rngs)
        if self.pooling == "cls":
            return x[:, 0].astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        return (jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(w.sum(axis=1), 1.0))

    @property
    def num_prefix(self) -> int:
        return 1 if self.pooling == "cls" else 0

    def states(self, tokens, mask, *, train: bool = False, rngs: nnx.Rngs | None = None,
               replace=None, replacement=None):
        """-> (x [B, prefix + T, E] after the final LayerNorm, mask [B, prefix + T]).
        replace: bool [B, T] positions whose token embedding is swapped for `replacement` [E]
        (masked-token prediction)."""
        b, t = tokens.shape
        if t > self.max_len:
            raise ValueError(f"input length {t} exceeds the model's max_len {self.max_len}")
        x = self.embed(tokens)  # [B, T, E]
        if replace is not None:
            x = jnp.where(replace[..., None], replacement.astype(x.dtype), x)
        if self.pooling == "cls":
            cls = jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
            mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
        x = (x + self.pos[...][: x.shape[1]]).astype(self.dtype)
        x = shard_sequence(x)  # length split over the mesh's "seq" axis (train.seq_shards)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        for block in self.blocks:
            x = block(x, mask, train=train, rngs=rngs)
        return self.norm(x), mask


def _bad(field, value, valid):
    raise ValueError(f"{field} must be one of {sorted(valid)}; got {value!r}")


class Head(nnx.Module):
    """LRA's classifier head: Dense(mlp) -> ReLU -> Dense(classes)."""

    def __init__(self, in_dim, mlp_dim, num_classes, rngs):
        self.hidden = nnx.Linear(in_dim, mlp_dim, rngs=rngs)
        self.logits = nnx.Linear(mlp_dim, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.logits(jax.nn.relu(self.hidden(x)))


class Classifier(nnx.Module):
    def __init__(self, *, num_classes: int, rngs: nnx.Rngs, **encoder_kwargs):
        self.encoder = Encoder(rngs=rngs, **encoder_kwargs)
        m = encoder_kwargs["model"]
        self.head = Head(m["emb_dim"], m["mlp_dim"], num_classes, rngs)

    def __call__(self, inputs, mask, *, train=False, rngs=None):
        """inputs int [B, T], mask bool [B, T] -> logits float32 [B, classes]."""
        return self.head(self.encoder(inputs, mask, train=train, rngs=rngs))


class DualEncoderClassifier(nnx.Module):
    def __init__(self, *, num_classes: int, rngs: nnx.Rngs, **encoder_kwargs):
        m = encoder_kwargs["model"]
        if m["interaction"] not in ("nli", "concat"):
            _bad("model.interaction", m["interaction"], ("nli", "concat"))
        self.interaction = m["interaction"]
        self.encoder = Encoder(rngs=rngs, **encoder_kwargs)
        width = m["emb_dim"] * (4 if self.interaction == "nli" else 2)
        self.head = Head(width, m["mlp_dim"], num_classes, rngs)

    def __call__(self, inputs, mask, *, train=False, rngs=None):
        """inputs int [B, 2, T], mask bool [B, 2, T] -> logits [B, classes]."""
        b = inputs.shape[0]
        both = self.encoder(inputs.reshape(2 * b, -1), mask.reshape(2 * b, -1),
                            train=train, rngs=rngs)  # one pass, shared weights
        u, v = both.reshape(b, 2, -1)[:, 0], both.reshape(b, 2, -1)[:, 1]
        feats = [u, v, u * v, u - v] if self.interaction == "nli" else [u, v]
        return self.head(jnp.concatenate(feats, axis=-1))


class TokenPredictor(nnx.Module):
    """Encoder + a per-token head Dense(emb -> vocab): masked-token prediction (bidirectional)
    or next-token prediction (causal=True). Pair inputs [B, 2, T] are encoded as 2B sequences
    and come back as [B, 2, T, vocab]."""

    def __init__(self, *, vocab_size: int, rngs: nnx.Rngs, causal: bool = False,
                 **encoder_kwargs):
        self.encoder = Encoder(vocab_size=vocab_size, causal=causal, rngs=rngs, **encoder_kwargs)
        emb = encoder_kwargs["model"]["emb_dim"]
        self.causal = causal
        self.mask_vector = nnx.Param(jax.random.normal(rngs.params(), (emb,)) * 0.02)
        self.logits = nnx.Linear(emb, vocab_size, rngs=rngs)

    def __call__(self, inputs, mask, *, train=False, rngs=None, replace=None):
        """inputs int [..., T], mask bool [..., T], replace bool [..., T] (positions to hide)
        -> logits float32 [..., T, vocab]."""
        lead, t = inputs.shape[:-1], inputs.shape[-1]
        flat = lambda a: None if a is None else a.reshape(-1, t)  # noqa: E731
        x, _ = self.encoder.states(flat(inputs), flat(mask), train=train, rngs=rngs,
                                   replace=flat(replace), replacement=self.mask_vector[...])
        x = x[:, self.encoder.num_prefix:]                       # [N, T, E]
        logits = self.logits(x).astype(jnp.float32)             # [N, T, vocab]
        return logits.reshape(*lead, t, -1)
