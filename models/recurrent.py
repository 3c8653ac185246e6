"""Segment-level recurrence: Transformer-XL (Dai et al., 2019), model.recurrence = "xl", and
the Compressive Transformer's memory (Rae et al., 2020), model.recurrence = "compressive".

A sequence of T tokens is read in segments of model.segment_len tokens, in order. Every layer n
attends over [memory of layer n; current segment], where the memory holds the inputs of layer n
(the outputs of layer n-1) for the last model.mem_len tokens before the segment, cached from the
previous segments with their gradient stopped (jax.lax.stop_gradient). Context therefore
reaches up to num_layers * mem_len tokens back while one segment costs
segment_len x (mem_len + segment_len) scores per head and layer.

Positions are the paper's relative encoding: no absolute position is added to the tokens, and
the score of query i and key j is

    (q_i + u) . k_j  +  (q_i + v) . W_R R_{i-j},      divided by sqrt(head_dim),

with R the sinusoid of the relative distance i - j (positions counted over [memory; segment]),
W_R a learned projection and u, v learned per-head biases (one pair per layer, the "untied"
form of the paper's code). Causal models (the LM objective) mask keys after the query;
bidirectional ones see the whole current segment and the memory. Padded keys (in the segment
or in the memory: the first segment's memory is empty) are masked.

Within-segment attention: this attention is dense with the relative terms, computed here (a
registered variant's function has no place for them); model.recurrence="xl" with any
attention.name other than "dense" is refused (ValueError here, ConfigError in
training/validate.py). Not combined with model.remat / model.reversible (refused); pooling must
be "mean" (no CLS prefix in a segmented stream); model.ffn_chunks works as in the encoder.

Compressive (partial): every layer also keeps a compressed memory of model.cmem_len slots and
attends over [compressed memory; memory; segment] (relative distances counted over that
concatenation, one position per slot). The segment_len states that leave the memory after a
segment are compressed by model.compression_rate (which must divide segment_len) with the
paper's mean pooling (over the real states of each group) and enter the compressed memory,
whose oldest slots are dropped. Not implemented: the paper's strided-convolution compression
and its attention-reconstruction loss (a mean pool has no parameters to train).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.encoder import DTYPES, EncoderBlock
from models.settings import ModelSettings

NEG = -1e30


def relative_sinusoids(distances: np.ndarray, dim: int) -> np.ndarray:
    """[N, dim] table [sin(d * f), cos(d * f)] (halves concatenated, as in the paper's code),
    f = 10000^(-2i/dim), for the (possibly negative) distances d."""
    inv = 1.0 / (10000.0 ** (np.arange(0, dim, 2) / dim))
    ang = np.asarray(distances, np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)[:, :dim].astype(np.float32)


class RelativeAttention(nnx.Module):
    """Multi-head attention of a segment over [memory; segment] with XL's relative terms."""

    def __init__(self, *, emb_dim, qkv_dim, num_heads, dropout_rate, dtype, causal, rngs):
        if qkv_dim % num_heads:
            raise ValueError(f"model.qkv_dim ({qkv_dim}) must be divisible by model.num_heads "
                             f"({num_heads})")
        self.num_heads, self.head_dim = num_heads, qkv_dim // num_heads
        self.emb_dim, self.causal, self.dropout_rate = emb_dim, causal, dropout_rate
        linear = lambda i, o, **kw: nnx.Linear(i, o, dtype=dtype, rngs=rngs, **kw)  # noqa: E731
        self.query = linear(emb_dim, qkv_dim)
        self.key = linear(emb_dim, qkv_dim)
        self.value = linear(emb_dim, qkv_dim)
        self.rel = linear(emb_dim, qkv_dim, use_bias=False)            # W_R
        self.out = linear(qkv_dim, emb_dim)
        shape = (num_heads, self.head_dim)
        self.u = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.02)
        self.v = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.02)

    def __call__(self, h, mem, mask, mem_mask, *, train=False, rngs=None):
        """h [B, T, E] (normed segment), mem [B, M, E] (normed memory), mask [B, T],
        mem_mask [B, M] -> [B, T, E]."""
        b, t, _ = h.shape
        m = mem.shape[1]
        heads, d = self.num_heads, self.head_dim
        cat = jnp.concatenate([mem, h], axis=1)                          # [B, M+T, E]
        q = self.query(h).reshape(b, t, heads, d)
        k = self.key(cat).reshape(b, m + t, heads, d)
        v = self.value(cat).reshape(b, m + t, heads, d)
        # distances i - j, query i at position m + i of [memory; segment], key j at j
        dist = (m + np.arange(t))[:, None] - np.arange(m + t)[None, :]  # [T, M+T]
        rel_d = np.arange(m + t - 1, -t, -1)                            # every distance, max first
        r = self.rel(jnp.asarray(relative_sinusoids(rel_d, self.emb_dim), h.dtype))
        r = r.reshape(len(rel_d), heads, d)                               # [N, H, D]
        u, vb = self.u[...].astype(q.dtype), self.v[...].astype(q.dtype)
        ac = jnp.einsum("bihd,bjhd->bhij", q + u, k)
        bd_all = jnp.einsum("bihd,nhd->bhin", q + vb, r)                 # [B, H, T, N]
        index = jnp.asarray((m + t - 1) - dist)                          # rel_d[index] == dist
        bd = jnp.take_along_axis(bd_all, jnp.broadcast_to(index, (b, heads, t, m + t)), axis=-1)
        scores = ((ac + bd) / np.sqrt(d)).astype(jnp.float32)
        allowed = jnp.concatenate([mem_mask, mask], axis=1)[:, None, None, :]
        if self.causal:
            allowed = allowed & jnp.asarray(dist >= 0)[None, None]
        scores = jnp.where(allowed, scores, NEG)
        w = jax.nn.softmax(scores, axis=-1)
        w = jnp.where(allowed, w, 0.0)
        if train and self.dropout_rate > 0 and rngs is not None:
            keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.dropout_rate, w.shape)
            w = jnp.where(keep, w / (1.0 - self.dropout_rate), 0.0)
        y = jnp.einsum("bhij,bjhd->bihd", w.astype(v.dtype), v).reshape(b, t, heads * d)
        return self.out(y)


class XLBlock(nnx.Module):
    """Pre-LayerNorm block: h + drop(RelAttn(LN(h) | LN(mem))), then the encoder's
    feed-forward branch (EncoderBlock.ffn_branch, model.ffn_chunks included)."""

    ffn_branch = EncoderBlock.ffn_branch
    _chunked_mlp = EncoderBlock._chunked_mlp
    _drop = EncoderBlock._drop

    def __init__(self, *, emb_dim, mlp_dim, qkv_dim, num_heads, dropout_rate,
                 attention_dropout_rate, dtype, causal, ffn_chunks, rngs):
        self.norm1 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.attention = RelativeAttention(emb_dim=emb_dim, qkv_dim=qkv_dim,
                                           num_heads=num_heads,
                                           dropout_rate=attention_dropout_rate, dtype=dtype,
                                           causal=causal, rngs=rngs)
        self.norm2 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)
        self.ffn_chunks = int(ffn_chunks)

    def __call__(self, h, mem, mask, mem_mask, *, train, rngs):
        a = self.attention(self.norm1(h), self.norm1(mem), mask, mem_mask, train=train,
                           rngs=rngs)
        h = h + self._drop(a, train, rngs)
        return h + self.ffn_branch(h, train=train, rngs=rngs)


def compress_mean(states, mask, rate: int):
    """The Compressive Transformer's mean-pooling compression: [B, N, E] states, mask [B, N]
    -> ([B, N / rate, E] means of each group of `rate` consecutive real states, [B, N / rate]
    True where the group has one)."""
    b, n, e = states.shape
    w = mask.reshape(b, n // rate, rate).astype(states.dtype)
    groups = states.reshape(b, n // rate, rate, e)
    total = jnp.sum(groups * w[..., None], axis=2)
    return total / jnp.maximum(w.sum(-1), 1.0)[..., None], mask.reshape(b, n // rate, rate).any(-1)


def check_xl(m: ModelSettings, attention_name: str) -> None:
    """ValueError for a combination the XL encoder does not support."""
    if m.recurrence == "compressive":
        rate, seg = m.compression_rate, m.segment_len
        if rate < 1 or (seg >= 1 and seg % rate):
            raise ValueError(f"model.recurrence='compressive' needs model.compression_rate >= 1 "
                             f"dividing model.segment_len; got compression_rate={rate}, "
                             f"segment_len={seg}")
    if attention_name != "dense":
        raise ValueError(
            f"model.recurrence='xl' computes its own within-segment attention (dense over "
            f"[memory; segment] with the relative-position terms); attention.name="
            f"{attention_name!r} is not supported with it: use attention 'dense'")
    if m.segment_len < 1:
        raise ValueError(f"model.recurrence='xl' needs model.segment_len >= 1; got "
                         f"{m.segment_len!r}")
    if m.mem_len < 0:
        raise ValueError(f"model.mem_len must be >= 0; got {m.mem_len!r}")
    if m.pooling != "mean":
        raise ValueError(f"model.recurrence='xl' needs model.pooling='mean' (no CLS prefix in "
                         f"a segmented stream); got {m.pooling!r}")
    for field in ("remat", "reversible", "num_global_tokens"):
        if getattr(m, field):
            raise ValueError(f"model.recurrence='xl' does not support model.{field}="
                             f"{getattr(m, field)!r}")


class XLEncoder(nnx.Module):
    """The Encoder's interface (states, __call__ with mean pooling, num_prefix = 0) with
    Transformer-XL's segment recurrence inside one call: the [B, T] input is cut into
    ceil(T / segment_len) segments (the last padded and masked) read in order."""

    def __init__(self, *, vocab_size: int, max_len: int, model: ModelSettings,
                 attention_cfg: Mapping[str, Any], grid_shape=None, causal: bool = False,
                 rngs: nnx.Rngs):
        m = model
        check_xl(m, attention_cfg["name"])
        self.dtype = DTYPES[m.dtype]
        self.pooling = "mean"
        self.max_len = max_len
        self.segment_len = m.segment_len
        self.mem_len = m.mem_len
        self.recurrence = m.recurrence
        compressive = self.recurrence == "compressive"
        self.cmem_len = m.cmem_len if compressive else 0
        self.compression_rate = m.compression_rate if compressive else 1
        emb = m.emb_dim
        self.emb_dim = emb
        self.embed = nnx.Embed(vocab_size, emb, rngs=rngs)
        self.dropout = nnx.Dropout(m.dropout_rate)
        self.blocks = nnx.List([
            XLBlock(emb_dim=emb, mlp_dim=m.mlp_dim, qkv_dim=m.qkv_dim,
                    num_heads=m.num_heads, dropout_rate=m.dropout_rate,
                    attention_dropout_rate=m.attention_dropout_rate, dtype=self.dtype,
                    causal=causal, ffn_chunks=m.ffn_chunks, rngs=rngs)
            for _ in range(m.num_layers)])
        self.norm = nnx.LayerNorm(emb, dtype=self.dtype, rngs=rngs)

    num_prefix = 0

    def __call__(self, tokens, mask, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x, mask = self.states(tokens, mask, train=train, rngs=rngs)
        w = mask.astype(jnp.float32)[..., None]
        return (jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(w.sum(axis=1), 1.0))

    def initial_memory(self, batch: int):
        """Empty memory (mems, mem_mask, cmems, cmem_mask): per layer [B, mem_len, E] and
        [B, cmem_len, E] zeros, masks [B, mem_len] / [B, cmem_len] all False."""
        e = self.emb_dim
        mem = jnp.zeros((batch, self.mem_len, e), self.dtype)
        cmem = jnp.zeros((batch, self.cmem_len, e), self.dtype)
        n = len(self.blocks)
        return ([mem] * n, jnp.zeros((batch, self.mem_len), bool), [cmem] * n,
                jnp.zeros((batch, self.cmem_len), bool))

    def segment(self, x, mask, memory, *, train=False, rngs=None):
        """One segment: x [B, S, E] embedded, mask [B, S], memory as initial_memory returns
        -> (out [B, S, E] before the final LayerNorm, the memory after the segment). Each
        layer attends over [compressed memory; memory; segment]."""
        mems, mem_mask, cmems, cmem_mask = memory
        kv_mask = jnp.concatenate([cmem_mask, mem_mask], axis=1)
        inputs = []
        for blk, mem, cmem in zip(self.blocks, mems, cmems):
            inputs.append(x)
            x = blk(x, jnp.concatenate([cmem, mem], axis=1), mask, kv_mask, train=train,
                    rngs=rngs)
        return x, self.update_memory(memory, inputs, mask)

    def update_memory(self, memory, inputs, mask):
        """Each layer's inputs of the segment enter its memory (FIFO of mem_len); the states
        that leave it (the oldest segment_len) are compressed by compression_rate (mean of
        each group of rate consecutive states, over the real ones; a slot is real when one of
        its states is) into the compressed memory (FIFO of cmem_len), or dropped (XL). Every
        memory has its gradient stopped."""
        mems, mem_mask, cmems, cmem_mask = memory
        m, cm = self.mem_len, self.cmem_len
        full_mask = jnp.concatenate([mem_mask, mask], axis=1)
        new_mems, new_cmems = [], []
        out_mask = full_mask[:, full_mask.shape[1] - m:]
        if cm:
            gone_mask = full_mask[:, :full_mask.shape[1] - m]
            comp_mask = None
        for mem, cmem, h in zip(mems, cmems, inputs):
            full = jnp.concatenate([mem, h], axis=1)
            new_mems.append(jax.lax.stop_gradient(full[:, full.shape[1] - m:]))
            if cm:
                comp, comp_mask = compress_mean(full[:, :full.shape[1] - m], gone_mask,
                                                self.compression_rate)
                new_cmems.append(jax.lax.stop_gradient(
                    jnp.concatenate([cmem, comp], axis=1)[:, -cm:]))
            else:
                new_cmems.append(cmem)
        if cm:
            cmem_mask = jnp.concatenate([cmem_mask, comp_mask], axis=1)[:, -cm:]
        return new_mems, out_mask, new_cmems, cmem_mask

    def states(self, tokens, mask, *, train: bool = False, rngs: nnx.Rngs | None = None,
               replace=None, replacement=None):
        """-> (x [B, T, E] after the final LayerNorm, mask [B, T]); as Encoder.states."""
        b, t = tokens.shape
        if t > self.max_len:
            raise ValueError(f"input length {t} exceeds the model's max_len {self.max_len}")
        x = self.embed(tokens)
        if replace is not None:
            x = jnp.where(replace[..., None], replacement.astype(x.dtype), x)
        x = self.dropout(x.astype(self.dtype), deterministic=not train, rngs=rngs)
        s = self.segment_len
        n = -(-t // s)
        x = jnp.pad(x, ((0, 0), (0, n * s - t), (0, 0)))
        padded = jnp.pad(mask, ((0, 0), (0, n * s - t)))
        memory = self.initial_memory(b)
        outs = []
        for i in range(n):
            y, memory = self.segment(x[:, i * s:(i + 1) * s], padded[:, i * s:(i + 1) * s],
                                     memory, train=train, rngs=rngs)
            outs.append(y)
        return self.norm(jnp.concatenate(outs, axis=1)[:, :t]), mask
