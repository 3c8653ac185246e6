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

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention

from attention.context_parallel import shard_sequence
from models import dropout_prng
from models.etc import RelativeGlobalLocalAttention
from models.multihead import MultiHeadAttention, layer_hparams
from models.settings import ModelSettings

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


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm block x -> x + F(x) -> (.) + G(.): F the attention branch
    drop(Attn(LN(x))), G the feed-forward branch drop(W2 drop(gelu(W1 LN(x)))).

    ffn_chunks > 1: G over the length in that many chunks (Reformer's chunked feed-forward):
    a loop (lax.map) over chunks, each under jax.checkpoint, meant to hold one chunk's
    [B, T / chunks, mlp_dim] hidden at a time. Measured (results/memory_depth_cpu.md, with
    reversible layers): less compiled temporary memory at 2-4 layers, more at 16. Equal to the
    unchunked branch without dropout; with dropout the hidden's mask is drawn per chunk (other
    draws, same distribution)."""

    def __init__(self, *, emb_dim, mlp_dim, dropout_rate, attention_dropout_rate, dtype, rngs,
                 ffn_chunks: int = 1, attention_cls=MultiHeadAttention, **attention_kwargs):
        self.norm1 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.attention = attention_cls(emb_dim=emb_dim, dtype=dtype, rngs=rngs,
                                       dropout_rate=attention_dropout_rate, **attention_kwargs)
        self.norm2 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)
        if not (isinstance(ffn_chunks, int) and ffn_chunks >= 1):
            raise ValueError(f"model.ffn_chunks must be an integer >= 1; got {ffn_chunks!r}")
        self.ffn_chunks = ffn_chunks

    def _drop(self, y, train, rngs):
        return self.dropout(y, deterministic=not train, rngs=rngs)

    def attention_branch(self, x, mask, *, train, rngs):
        """F(x) = drop(Attn(LN1(x)))."""
        return self._drop(self.attention(self.norm1(x), mask, train=train, rngs=rngs),
                          train, rngs)

    def ffn_branch(self, x, *, train, rngs):
        """G(x) = drop(W2 drop(gelu(W1 LN2(x)))), whole or in ffn_chunks chunks of the length."""
        h = self.norm2(x)
        if self.ffn_chunks > 1:
            y = self._chunked_mlp(h, train=train, rngs=rngs)
        else:
            y = self.mlp_out(self._drop(jax.nn.gelu(self.mlp_in(h)), train, rngs))
        return self._drop(y, train, rngs)

    def _chunked_mlp(self, h, *, train, rngs):
        b, t, e = h.shape
        n = min(self.ffn_chunks, t)
        size = -(-t // n)
        hp = jnp.pad(h, ((0, 0), (0, n * size - t), (0, 0)))
        chunks = hp.reshape(b, n, size, e).swapaxes(0, 1)            # [n, B, size, E]
        rate = float(self.dropout.rate)
        key = rngs.dropout() if (train and rate > 0 and rngs is not None) else None

        def one(args):
            i, xc = args
            y = jax.nn.gelu(self.mlp_in(xc))                        # [B, size, mlp]
            if key is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, y.shape)
                y = jnp.where(keep, y / (1.0 - rate), 0).astype(y.dtype)
            return self.mlp_out(y)

        out = jax.lax.map(jax.checkpoint(one), (jnp.arange(n), chunks))  # [n, B, size, E]
        return out.swapaxes(0, 1).reshape(b, n * size, -1)[:, :t]

    def __call__(self, x, mask, *, train, rngs):
        x = x + self.attention_branch(x, mask, train=train, rngs=rngs)
        return x + self.ffn_branch(x, train=train, rngs=rngs)


# Dropout masks: Philox2x32-10 bits as an elementwise function of (key, position)
# (models/dropout_prng.py), from one key of the caller's stream per forward pass (dropout_rngs).
# JAX's default threefry is a rolled loop on the CPU whose per-call buffers XLA never reused:
# under remat/reversible that was almost all of what still grew with depth with dropout on
# (results/memory_depth_cpu_dropout.md); JAX's own philox did not compile for sharded arrays.
DROPOUT_PRNG = dropout_prng.IMPL


def dropout_rngs(rngs: nnx.Rngs | None) -> nnx.Rngs | None:
    """A fresh dropout stream for one forward pass: one key drawn from `rngs` turned into a
    DROPOUT_PRNG key (same `rngs`, same masks; other masks than threefry's, same distribution)."""
    if rngs is None:
        return None
    data = jax.random.bits(rngs.dropout(), (2,), jnp.uint32)
    return nnx.Rngs(dropout=jax.random.wrap_key_data(data, impl=DROPOUT_PRNG))


def _after(ct, tree):
    """`tree`'s values made data-dependent on the cotangent `ct`, unchanged (unless ct's first
    element is NaN, when the gradient is NaN anyway). A recompute in the backward pass that
    starts from these values can neither run before the backward pass reaches it nor be merged
    (CSE) with the identical forward computation, so its activations are not kept from the
    forward pass. jax.lax.optimization_barrier is meant for this, but the CPU compiler drops it:
    with jax.checkpoint or a barrier, the compiled temporary memory did not shrink at all."""
    flag = jnp.isnan(ct.reshape(-1)[0])

    def tie(a):
        if a is None:
            return a
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(a)
            return jax.random.wrap_key_data(data + flag.astype(data.dtype),
                                            impl=jax.random.key_impl(a))
        if jnp.issubdtype(a.dtype, jnp.number):
            return a + flag.astype(a.dtype)
        return a
    return jax.tree.map(tie, tree)


def _split_block(block):
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    return graphdef, params, rest


def _branch(graphdef, params, rest, x, mask, key, *, which: str, train: bool):
    """F or G of one block as a pure function of its parameters (dropout from `key`)."""
    block = nnx.merge(graphdef, params, rest)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    if which == "f":
        return block.attention_branch(x, mask, train=train, rngs=rngs)
    return block.ffn_branch(x, train=train, rngs=rngs)


def _rev_forward(graphdefs, train, params, rest, x1, x2, mask, keys):
    for i, g in enumerate(graphdefs):
        kf, kg = (None, None) if keys is None else (keys[i, 0], keys[i, 1])
        x1 = x1 + _branch(g, params[i], rest[i], x2, mask, kf, which="f", train=train)
        x2 = x2 + _branch(g, params[i], rest[i], x1, mask, kg, which="g", train=train)
    return x1, x2


def _rev_with_vjp(graphdefs, train):
    """The reversible stack with a backward pass that keeps no activation per layer: it
    rebuilds each layer's inputs from its outputs (x2 = y2 - G(y1), x1 = y1 - F(x2)) while it
    walks the layers in reverse, and takes the layer's VJP at the rebuilt inputs."""

    @jax.custom_vjp
    def rev(params, rest, x1, x2, mask, keys):
        return _rev_forward(graphdefs, train, params, rest, x1, x2, mask, keys)

    def fwd(params, rest, x1, x2, mask, keys):
        y1, y2 = _rev_forward(graphdefs, train, params, rest, x1, x2, mask, keys)
        return (y1, y2), (params, rest, y1, y2, mask, keys)

    def bwd(res, cts):
        params, rest, y1, y2, mask, keys = res
        dy1, dy2 = cts
        grads = [None] * len(graphdefs)
        for i in reversed(range(len(graphdefs))):
            g = graphdefs[i]
            # the dropout keys tied to the cotangent: the recomputed dropout bits are not the
            # forward pass's (merged by CSE, they would be kept alive for every layer)
            p_i, r_i = params[i], rest[i]
            k_i = None if keys is None else _after(dy1, keys[i])
            kf, kg = (None, None) if k_i is None else (k_i[0], k_i[1])
            gy, g_vjp = jax.vjp(
                lambda p, y: _branch(g, p, r_i, y, mask, kg, which="g", train=train), p_i, y1)
            x2 = y2 - gy
            dp_g, dy1_g = g_vjp(dy2)
            dy1 = dy1 + dy1_g
            fx, f_vjp = jax.vjp(
                lambda p, y: _branch(g, p, r_i, y, mask, kf, which="f", train=train), p_i, x2)
            x1 = y1 - fx
            dp_f, dx2_f = f_vjp(dy1)
            dy2 = dy2 + dx2_f
            grads[i] = jax.tree.map(jnp.add, dp_f, dp_g)
            y1, y2 = x1, x2
        return grads, None, dy1, dy2, None, None

    rev.defvjp(fwd, bwd)
    return rev


def reversible_stack(blocks, x, mask, *, train: bool, rngs, custom_vjp: bool = True):
    """RevNet / Reformer reversible residual layers over two copies of the stream:
    x1 = x2 = x; per block y1 = x1 + F(x2), y2 = x2 + G(y1); output (y1 + y2) / 2.
    custom_vjp=False: the same function differentiated by plain autodiff (the reference)."""
    split = [_split_block(b) for b in blocks]
    graphdefs = tuple(s[0] for s in split)
    params = [s[1] for s in split]
    rest = [s[2] for s in split]
    keys = None
    if train and rngs is not None:
        keys = jax.random.split(rngs.dropout(), (len(blocks), 2))
    fn = (_rev_with_vjp(graphdefs, bool(train)) if custom_vjp
          else functools.partial(_rev_forward, graphdefs, bool(train)))
    y1, y2 = fn(params, rest, x, x, mask, keys)
    return (y1 + y2) / 2


class Encoder(nnx.Module):
    """tokens int [B, T], mask bool [B, T] -> pooled [B, emb_dim] (or per-token states).

    causal=True: every attention layer is causal (position i sees positions <= i); a variant
    that cannot be causal is a ValueError here, naming it."""

    def __init__(self, *, vocab_size: int, max_len: int, model: ModelSettings,
                 attention_cfg: Mapping[str, Any], grid_shape=None, causal: bool = False,
                 rngs: nnx.Rngs):
        m = model
        self.dtype = DTYPES[m.dtype]
        self.pooling = m.pooling
        # ETC (Ainslie et al. 2020): num_global_tokens learned global tokens (not positions of
        # the input) after the CLS prefix; with the longformer pattern, the prefix (CLS and
        # global tokens) attends to everything and every long token to its window and the
        # prefix. The model sets the variant's num_global to the prefix length.
        self.num_global = m.num_global_tokens
        name = attention_cfg["name"]
        if self.num_global:
            check_global_tokens(self.num_global, name)
        prefix = (1 if self.pooling == "cls" else 0) + self.num_global
        self._num_prefix = prefix
        self.max_len = max_len
        total = max_len + prefix
        emb = m.emb_dim
        self.embed = nnx.Embed(vocab_size, emb, rngs=rngs)
        if m.pos_embedding == "learned":
            self.pos = nnx.Param(jax.random.normal(rngs.params(), (total, emb)) * 0.02)
        elif m.pos_embedding == "sinusoidal2d":
            if grid_shape is None or int(np.prod(grid_shape)) != max_len:
                raise ValueError(
                    "model.pos_embedding='sinusoidal2d' is for image-like tasks whose max_len is "
                    f"rows * cols of the task's grid; got grid_shape={grid_shape}, "
                    f"max_len={max_len}. Use 'sinusoidal' or 'learned' for sequences.")
            self.pos = nnx.Variable(jnp.asarray(sinusoidal_2d_positions(grid_shape, emb, prefix)))
        else:
            self.pos = nnx.Variable(jnp.asarray(sinusoidal_positions(total, emb)))
        if self.pooling == "cls":
            self.cls = nnx.Param(jax.random.normal(rngs.params(), (emb,)) * 0.02)
        if self.num_global:
            self.global_tokens = nnx.Param(
                jax.random.normal(rngs.params(), (self.num_global, emb)) * 0.02)
        self.dropout = nnx.Dropout(m.dropout_rate)
        overrides = {k: v for k, v in attention_cfg.items() if k not in ("name", "impl")}
        if self.num_global:
            overrides["num_global"] = prefix
        relative = {}   # ETC's relative position labels: models/etc.py's attention layer
        if m.relative_labels:
            if not self.num_global:
                raise ValueError("model.relative_labels=True (ETC relative position labels) "
                                 "needs model.num_global_tokens > 0")
            relative = {"attention_cls": RelativeGlobalLocalAttention,
                        "relative_max_distance": m.relative_max_distance}
        self.blocks = nnx.List([
            EncoderBlock(
                emb_dim=emb, mlp_dim=m.mlp_dim, dropout_rate=m.dropout_rate,
                dtype=self.dtype, rngs=rngs, qkv_dim=m.qkv_dim, num_heads=m.num_heads,
                ffn_chunks=m.ffn_chunks,
                attention_name=name, impl=attention_cfg.get("impl", "xla"),
                hparams=layer_hparams(name, overrides, layer_index=i, grid_shape=grid_shape,
                                      num_prefix=prefix),
                max_len=total, attention_dropout_rate=m.attention_dropout_rate,
                causal=causal, **relative)
            for i in range(m.num_layers)])
        self.norm = nnx.LayerNorm(emb, dtype=self.dtype, rngs=rngs)
        self.remat = m.remat
        self.reversible = m.reversible
        if self.remat and self.reversible:
            raise ValueError("model.remat and model.reversible together: reversible layers "
                             "already recompute in the backward pass; set one of them")
        if self.reversible and attention.get(name).update_buffers is not None:
            raise ValueError(
                f"model.reversible: attention variant {name!r} updates buffers in training "
                f"(update_buffers), which a recomputed reversible layer cannot do; use "
                f"model.remat instead")
        self.custom_vjp = True   # reversible: False = plain autodiff of the same function (tests)

    def __call__(self, tokens, mask, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x, mask = self.states(tokens, mask, train=train, rngs=rngs)
        if self.pooling == "cls":
            return x[:, 0].astype(jnp.float32)
        x, mask = x[:, self.num_prefix:], mask[:, self.num_prefix:]   # long tokens only
        w = mask.astype(jnp.float32)[..., None]
        return (jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(w.sum(axis=1), 1.0))

    @property
    def num_prefix(self) -> int:
        """Tokens before the input's: CLS (pooling "cls") and the ETC global tokens."""
        return self._num_prefix

    def states(self, tokens, mask, *, train: bool = False, rngs: nnx.Rngs | None = None,
               replace=None, replacement=None):
        """-> (x [B, prefix + T, E] after the final LayerNorm, mask [B, prefix + T]).
        replace: bool [B, T] positions whose token embedding is swapped for `replacement` [E]
        (masked-token prediction)."""
        b, t = tokens.shape
        rngs = dropout_rngs(rngs) if train else rngs
        if t > self.max_len:
            raise ValueError(f"input length {t} exceeds the model's max_len {self.max_len}")
        x = self.embed(tokens)  # [B, T, E]
        if replace is not None:
            x = jnp.where(replace[..., None], replacement.astype(x.dtype), x)
        prefix = []
        if self.pooling == "cls":
            prefix.append(jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])))
        if self.num_global:
            prefix.append(jnp.broadcast_to(self.global_tokens[...],
                                           (b, self.num_global, x.shape[-1])))
        if prefix:
            x = jnp.concatenate(prefix + [x.astype(prefix[0].dtype)], axis=1)
            mask = jnp.concatenate([jnp.ones((b, self.num_prefix), bool), mask], axis=1)
        x = (x + self.pos[...][: x.shape[1]]).astype(self.dtype)
        x = shard_sequence(x)  # length split over the mesh's "seq" axis (train.seq_shards)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        if self.reversible:
            x = reversible_stack(self.blocks, x, mask, train=train, rngs=rngs,
                                 custom_vjp=self.custom_vjp)
        elif self.remat:
            for block in self.blocks:
                x = _remat_block(block, x, mask, train, rngs)
        else:
            for block in self.blocks:
                x = block(x, mask, train=train, rngs=rngs)
        return self.norm(x), mask


def _remat_block(block, x, mask, train, rngs):
    """One block that keeps only its inputs for the backward pass (jax.checkpoint's idea, as
    a custom VJP): the backward pass recomputes the block from its input, tied to the incoming
    cotangent (_after), so that XLA can neither run it early nor merge it with the forward
    pass; with jax.checkpoint / nnx.remat the CPU compiler's temporary memory did not shrink.
    Dropout keys come from the same rngs as without remat (identical draws), and a variant's
    buffer updates (routing) are returned as in the plain block."""
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    rng_def, rng_state = nnx.split(rngs) if rngs is not None else (None, None)
    y, new_rest, new_rng = _remat_vjp(graphdef, rng_def, bool(train))(
        params, rest, x, mask, rng_state)
    nnx.update(block, new_rest)
    if rngs is not None:
        nnx.update(rngs, new_rng)
    return y


def _remat_run(graphdef, rng_def, train, params, rest, x, mask, rng_state):
    copy = lambda tree: jax.tree.map(lambda a: a, tree)  # noqa: E731  (merge shares Variables)
    block = nnx.merge(graphdef, params, copy(rest))
    rngs = None if rng_def is None else nnx.merge(rng_def, copy(rng_state))
    y = block(x, mask, train=train, rngs=rngs)
    new_rng = None if rngs is None else nnx.split(rngs)[1]
    return y, nnx.split(block, nnx.Param, ...)[2], new_rng


def _remat_vjp(graphdef, rng_def, train):
    run = functools.partial(_remat_run, graphdef, rng_def, train)

    @jax.custom_vjp
    def block(params, rest, x, mask, rng_state):
        return run(params, rest, x, mask, rng_state)

    def fwd(params, rest, x, mask, rng_state):
        return run(params, rest, x, mask, rng_state), (params, rest, x, mask, rng_state)

    def bwd(res, cts):
        params, rest, x, mask, rng_state = res
        dy = cts[0]
        x, rng_state = _after(dy, (x, rng_state))
        _, vjp = jax.vjp(lambda p, xx, r: run(p, rest, xx, mask, r)[0], params, x, rng_state)
        dp, dx, _ = vjp(dy)
        return dp, None, dx, None, None

    block.defvjp(fwd, bwd)
    return block


GLOBAL_TOKEN_VARIANTS = ("longformer",)


def check_global_tokens(num_global: int, attention_name: str) -> None:
    """model.num_global_tokens > 0 (ETC) needs a variant whose global positions the model
    can set (longformer: num_global)."""
    if num_global < 0:
        raise ValueError(f"model.num_global_tokens must be >= 0; got {num_global}")
    if attention_name not in GLOBAL_TOKEN_VARIANTS:
        raise ValueError(
            f"model.num_global_tokens={num_global} (ETC global tokens) needs an attention "
            f"variant with global positions the model sets: one of {GLOBAL_TOKEN_VARIANTS}; "
            f"got attention.name={attention_name!r}")


def make_encoder(**kwargs):
    """Encoder, or the segment-recurrent XLEncoder (models/recurrent.py) when
    model.recurrence == "xl"; same interface (states, __call__, num_prefix)."""
    if kwargs["model"].recurrence in ("xl", "compressive"):
        from models.recurrent import XLEncoder
        return XLEncoder(**kwargs)
    return Encoder(**kwargs)


class Head(nnx.Module):
    """LRA's classifier head: Dense(mlp) -> ReLU -> Dense(classes)."""

    def __init__(self, in_dim, mlp_dim, num_classes, rngs):
        self.hidden = nnx.Linear(in_dim, mlp_dim, rngs=rngs)
        self.logits = nnx.Linear(mlp_dim, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.logits(jax.nn.relu(self.hidden(x)))


class Classifier(nnx.Module):
    def __init__(self, *, num_classes: int, rngs: nnx.Rngs, **encoder_kwargs):
        self.encoder = make_encoder(rngs=rngs, **encoder_kwargs)
        m = encoder_kwargs["model"]
        self.head = Head(m.emb_dim, m.mlp_dim, num_classes, rngs)

    def __call__(self, inputs, mask, *, train=False, rngs=None):
        """inputs int [B, T], mask bool [B, T] -> logits float32 [B, classes]."""
        return self.head(self.encoder(inputs, mask, train=train, rngs=rngs))


class DualEncoderClassifier(nnx.Module):
    def __init__(self, *, num_classes: int, rngs: nnx.Rngs, **encoder_kwargs):
        m = encoder_kwargs["model"]
        self.interaction = m.interaction
        self.encoder = make_encoder(rngs=rngs, **encoder_kwargs)
        width = m.emb_dim * (4 if self.interaction == "nli" else 2)
        self.head = Head(width, m.mlp_dim, num_classes, rngs)

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
        self.encoder = make_encoder(vocab_size=vocab_size, causal=causal, rngs=rngs,
                                    **encoder_kwargs)
        emb = encoder_kwargs["model"].emb_dim
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
