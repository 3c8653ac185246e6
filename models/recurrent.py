"""Segment-level recurrence: Transformer-XL (Dai et al., 2019), model.recurrence = "xl", and
the Compressive Transformer (Rae et al., 2020), model.recurrence = "compressive".

A sequence of T tokens is read in segments of model.segment_len tokens, in order. Every layer n
attends over [memory of layer n; current segment], where the memory holds the inputs of layer n
(the outputs of layer n-1) for the last model.mem_len tokens before the segment, cached from the
previous segments with their gradient stopped (jax.lax.stop_gradient). Context therefore
reaches up to num_layers * mem_len tokens back while one segment costs
segment_len x (mem_len + segment_len) scores per head and layer.

Within-segment attention, attention.name = "dense": the paper's relative encoding. No absolute
position is added to the tokens, and the score of query i and key j is

    (q_i + u) . k_j  +  (q_i + v) . W_R R_{i-j},      divided by sqrt(head_dim),

with R the sinusoid of the relative distance i - j (positions counted over [memory; segment]),
W_R a learned projection and u, v learned per-head biases (one pair per layer, the "untied"
form of the paper's code). Causal models (the LM objective) mask keys after the query;
bidirectional ones see the whole current segment and the memory. Padded keys (in the segment
or in the memory: the first segment's memory is empty) are masked.

Within-segment attention, any other registered variant (e.g. attention.name = "local":
"Transformer-XL with local attention"): the layer's MultiHeadAttention (models/multihead.py)
runs the variant on the window W = [memory; segment] as one self-attention sequence (queries
and keys/values both W, kv_mask = the window's real slots, the model's causal flag) and keeps
the segment's rows; the memory's rows are computed and discarded (the variant's contract is
self-attention over one sequence), so a segment costs the variant's cost at length
mem_len + segment_len. DEVIATION from the paper: u, v and W_R R_{i-j} cannot enter a registered
variant's function, so there are no relative terms. Positions (model.xl_positions): "window"
(default) adds the sinusoids of the window's slots 0 .. |W| - 1 (the encoder's absolute table)
to the attention layer's normalised input in every layer, so a state has the same code as long
as it sits in the same slot of a window; that code changes when it moves from the segment into
the memory (the paper's relative form has no such shift). "none": no position information but
the causal mask and the variant's own pattern (NoPos); then mem_len=0 is the plain encoder with
its position table zeroed. Variants whose record asks the model for a 2D grid (axial, local2d)
are refused. Dense keeps the exact relative form above.

Not combined with model.remat / model.reversible / model.num_global_tokens (refused); pooling
must be "mean" (no CLS prefix in a segmented stream); model.ffn_chunks works as in the encoder.
The rules are `xl_problems` (ValueError here, ConfigError lines in training/validate.py).

Compressive: every layer also keeps a compressed memory of model.cmem_len slots and attends
over [compressed memory; memory; segment] (relative distances, or window slots, counted over
that concatenation, one position per slot). The segment_len states that leave the memory after
a segment are compressed by model.compression_rate (which must divide segment_len) and enter
the compressed memory, whose oldest slots are dropped. model.compression:
- "mean": the mean of each group of compression_rate consecutive real states (no parameters).
- "conv": the paper's strided 1-D convolution, one per layer, kernel = stride =
  compression_rate, emb_dim -> emb_dim channels, learned (padded states enter it as zeros).
  Trained by the paper's attention-reconstruction loss only: the compressed memory enters the
  model with its gradient stopped, and for every layer and segment, with h the layer's inputs
  of the segment and old the states leaving its memory (both gradient-stopped),

      L = || attn(h, old) - attn(h, conv(old)) ||^2

  where attn is the layer's content-based attention (softmax(q k^T / sqrt(d)) v per head, the
  heads concatenated before the output projection; no relative terms, no dropout) with the
  layer's LayerNorm and q/k/v projections held fixed (stop_gradient), so L's gradient reaches
  only the convolution. The model reports it as `recon_loss`: the sum over layers of the mean,
  over the real queries of every segment whose old states hold a real one, of the mean squared
  difference over the features. The training loop adds model.recon_weight x recon_loss to the
  objective's loss (training/loop.py) and logs it; evaluation does not compute it. With "mean"
  there is nothing to train and no reconstruction loss is computed (recon_weight is ignored).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention
from models.encoder import DTYPES, EncoderBlock, dropout_rngs, sinusoidal_positions
from models.multihead import MultiHeadAttention, layer_hparams
from models.settings import ModelSettings

NEG = -1e30


class AuxLoss(nnx.Intermediate):
    """A loss term the model adds in training (metadata `weight`); the loop pops every one
    (models.pop_aux_losses), adds weight x value to the objective's loss and logs the value
    under the variable's name."""


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
    """Pre-LayerNorm block: h + drop(Attn(LN(h) | LN(mem))), then the encoder's feed-forward
    branch (EncoderBlock.ffn_branch, model.ffn_chunks included). Attn is RelativeAttention
    (attention "dense") or the registered variant over the window [memory; segment]
    (MultiHeadAttention, segment rows kept). `compressor`: the layer's strided convolution
    (model.compression="conv"), else None."""

    ffn_branch = EncoderBlock.ffn_branch
    _chunked_mlp = EncoderBlock._chunked_mlp
    _drop = EncoderBlock._drop

    def __init__(self, *, emb_dim, mlp_dim, qkv_dim, num_heads, dropout_rate,
                 attention_dropout_rate, dtype, causal, ffn_chunks, rngs, attention_name="dense",
                 variant_kwargs=None, window_positions=True, conv_rate=0):
        self.norm1 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.relative = attention_name == "dense"
        self.window_positions = bool(window_positions)
        if self.relative:
            self.attention = RelativeAttention(emb_dim=emb_dim, qkv_dim=qkv_dim,
                                               num_heads=num_heads,
                                               dropout_rate=attention_dropout_rate,
                                               dtype=dtype, causal=causal, rngs=rngs)
        else:
            self.attention = MultiHeadAttention(
                emb_dim=emb_dim, qkv_dim=qkv_dim, num_heads=num_heads,
                attention_name=attention_name, dropout_rate=attention_dropout_rate,
                dtype=dtype, causal=causal, rngs=rngs, **variant_kwargs)
        self.norm2 = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)
        self.ffn_chunks = int(ffn_chunks)
        self.compressor = (nnx.Conv(emb_dim, emb_dim, kernel_size=(conv_rate,),
                                    strides=(conv_rate,), padding="VALID", dtype=dtype,
                                    rngs=rngs) if conv_rate else None)

    def attend(self, h, mem, mask, mem_mask, *, train, rngs):
        """The attention branch's output before dropout: segment h [B, T, E] over
        [mem [B, M, E]; h] -> [B, T, E]."""
        if self.relative:
            return self.attention(self.norm1(h), self.norm1(mem), mask, mem_mask, train=train,
                                  rngs=rngs)
        t = h.shape[1]
        window = self.norm1(jnp.concatenate([mem, h], axis=1))
        if self.window_positions:
            table = sinusoidal_positions(window.shape[1], window.shape[2])
            window = window + jnp.asarray(table, window.dtype)
        out = self.attention(window, jnp.concatenate([mem_mask, mask], axis=1), train=train,
                             rngs=rngs)
        return out[:, out.shape[1] - t:]

    def __call__(self, h, mem, mask, mem_mask, *, train, rngs):
        a = self.attend(h, mem, mask, mem_mask, train=train, rngs=rngs)
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


def compress_conv(conv: nnx.Conv, states, mask, rate: int):
    """The paper's strided-convolution compression: padded states zeroed, then the layer's
    Conv1D with kernel = stride = rate: slot j = sum_r states[j * rate + r] @ K[r] + bias.
    -> ([B, N / rate, E], [B, N / rate] True where the group has a real state)."""
    b, n, _ = states.shape
    zeroed = jnp.where(mask[..., None], states, 0).astype(conv.kernel.dtype)
    return conv(zeroed), mask.reshape(b, n // rate, rate).any(-1)


def content_attention(block: XLBlock, h, mem, mem_mask):
    """The block's content-based attention of queries LN(h) over keys/values LN(mem), with its
    LayerNorm and q/k/v projections gradient-stopped: softmax(q k^T / sqrt(d)) v per head,
    heads concatenated -> [B, T, H * D] (zeros for a row without real keys)."""
    sg = jax.lax.stop_gradient
    att = block.attention
    nh, d = att.num_heads, att.head_dim

    def proj(x, lin):
        return x @ sg(lin.kernel[...]) + sg(lin.bias[...])

    def norm(x):
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
        ln = block.norm1
        return (x - mu) * jax.lax.rsqrt(var + ln.epsilon) * sg(ln.scale[...]) + sg(ln.bias[...])

    b, t, _ = h.shape
    m = mem.shape[1]
    hn, mn = norm(h), norm(mem)
    q = proj(hn, att.query).reshape(b, t, nh, d)
    k = proj(mn, att.key).reshape(b, m, nh, d)
    v = proj(mn, att.value).reshape(b, m, nh, d)
    scores = jnp.einsum("bihd,bjhd->bhij", q, k).astype(jnp.float32) / np.sqrt(d)
    allowed = mem_mask[:, None, None, :]
    w = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, scores, NEG), axis=-1), 0.0)
    return jnp.einsum("bhij,bjhd->bihd", w.astype(v.dtype), v).reshape(b, t, nh * d)


def reconstruction_terms(block: XLBlock, h, mask, old, old_mask, comp, comp_mask):
    """One layer and segment of the attention-reconstruction loss: (sum over the counted
    queries of the mean squared difference over features, number of counted queries); a query
    counts when it is real and the old states hold a real one. h and old are gradient-stopped
    here; comp keeps its gradient (to the convolution)."""
    sg = jax.lax.stop_gradient
    h, old = sg(h), sg(old)
    full = content_attention(block, h, old, old_mask)
    packed = content_attention(block, h, comp, comp_mask)
    err = jnp.mean(jnp.square((full - packed).astype(jnp.float32)), axis=-1)     # [B, T]
    counted = (mask & old_mask.any(-1, keepdims=True)).astype(jnp.float32)
    return jnp.sum(err * counted), jnp.sum(counted)


# ---- the rules (one source: ValueError here, ConfigError lines in training/validate.py) ----

def xl_problems(m: Mapping[str, Any], attention_name) -> list[str]:
    """What the XL / Compressive encoder does not support in model settings `m` (a mapping of
    the model group's fields, possibly invalid values) with attention `attention_name`: one
    message per problem, [] when fine."""
    rec = m.get("recurrence")
    out = []
    if isinstance(attention_name, str) and attention_name in attention.names():
        supplies = attention.get(attention_name).model_supplies.values()
        if "grid_shape" in supplies:
            out.append(f"model.recurrence={rec!r} runs the within-segment attention on the "
                       f"window [memory; segment], a 1D sequence: attention.name="
                       f"{attention_name!r} needs a 2D grid and is not supported with it")
    seg = m.get("segment_len")
    if not (_is_int(seg) and seg >= 1):
        out.append(f"model.recurrence={rec!r} needs model.segment_len >= 1; got {seg!r}")
    if _is_int(m.get("mem_len")) and m.get("mem_len") < 0:
        out.append(f"model.mem_len must be >= 0; got {m.get('mem_len')!r}")
    if m.get("pooling") != "mean":
        out.append(f"model.recurrence={rec!r} needs model.pooling='mean' (no CLS prefix in "
                   f"a segmented stream); got {m.get('pooling')!r}")
    for field in ("remat", "reversible"):
        if m.get(field) is True:
            out.append(f"model.recurrence={rec!r} does not support model.{field}=True")
    if _is_int(m.get("num_global_tokens")) and m.get("num_global_tokens") > 0:
        out.append(f"model.recurrence={rec!r} does not support model.num_global_tokens > 0")
    rate = m.get("compression_rate")
    if rec == "compressive" and _is_int(rate) and _is_int(seg) and (
            rate < 1 or (seg >= 1 and seg % rate)):
        out.append(f"model.recurrence='compressive': model.compression_rate={rate} must "
                   f"divide model.segment_len={seg}")
    return out


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_xl(m: ModelSettings, attention_name: str) -> None:
    """ValueError listing what the XL encoder does not support (xl_problems)."""
    problems = xl_problems(m.as_dict(), attention_name)
    if problems:
        raise ValueError("; ".join(problems))


class XLEncoder(nnx.Module):
    """The Encoder's interface (states, __call__ with mean pooling, num_prefix = 0) with
    Transformer-XL's segment recurrence inside one call: the [B, T] input is cut into
    ceil(T / segment_len) segments (the last padded and masked) read in order."""

    def __init__(self, *, vocab_size: int, max_len: int, model: ModelSettings,
                 attention_cfg: Mapping[str, Any], grid_shape=None, causal: bool = False,
                 rngs: nnx.Rngs):
        m = model
        name = attention_cfg["name"]
        check_xl(m, name)
        self.dtype = DTYPES[m.dtype]
        self.pooling = "mean"
        self.max_len = max_len
        self.segment_len = m.segment_len
        self.mem_len = m.mem_len
        self.recurrence = m.recurrence
        compressive = self.recurrence == "compressive"
        self.cmem_len = m.cmem_len if compressive else 0
        self.compression_rate = m.compression_rate if compressive else 1
        self.compression = m.compression if compressive else "none"
        conv = self.compression == "conv" and self.cmem_len > 0
        self.recon_weight = float(m.recon_weight) if conv else 0.0
        emb = m.emb_dim
        self.emb_dim = emb
        self.embed = nnx.Embed(vocab_size, emb, rngs=rngs)
        self.dropout = nnx.Dropout(m.dropout_rate)
        window = self.cmem_len + self.mem_len + self.segment_len
        overrides = {k: v for k, v in attention_cfg.items() if k not in ("name", "impl")}
        variant = lambda i: None if name == "dense" else dict(  # noqa: E731
            hparams=layer_hparams(name, overrides, layer_index=i, num_prefix=0),
            impl=attention_cfg.get("impl", "xla"), max_len=window)
        self.blocks = nnx.List([
            XLBlock(emb_dim=emb, mlp_dim=m.mlp_dim, qkv_dim=m.qkv_dim,
                    num_heads=m.num_heads, dropout_rate=m.dropout_rate,
                    attention_dropout_rate=m.attention_dropout_rate, dtype=self.dtype,
                    causal=causal, ffn_chunks=m.ffn_chunks, rngs=rngs, attention_name=name,
                    variant_kwargs=variant(i), window_positions=m.xl_positions == "window",
                    conv_rate=self.compression_rate if conv else 0)
            for i in range(m.num_layers)])
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

    def segment(self, x, mask, memory, *, train=False, rngs=None, recon=False):
        """One segment: x [B, S, E] embedded, mask [B, S], memory as initial_memory returns
        -> (out [B, S, E] before the final LayerNorm, the memory after the segment, the
        reconstruction terms per layer [(sum, count)] when `recon` and the compression is a
        convolution, else None). Each layer attends over [compressed memory; memory;
        segment]."""
        mems, mem_mask, cmems, cmem_mask = memory
        kv_mask = jnp.concatenate([cmem_mask, mem_mask], axis=1)
        inputs = []
        for blk, mem, cmem in zip(self.blocks, mems, cmems):
            inputs.append(x)
            x = blk(x, jnp.concatenate([cmem, mem], axis=1), mask, kv_mask, train=train,
                    rngs=rngs)
        new_memory, terms = self.update_memory(memory, inputs, mask, recon=recon)
        return x, new_memory, terms

    def update_memory(self, memory, inputs, mask, *, recon=False):
        """Each layer's inputs of the segment enter its memory (FIFO of mem_len); the states
        that leave it (the oldest segment_len) are compressed by compression_rate (mean of
        each group of rate consecutive real states, or the layer's strided convolution; a slot
        is real when one of its states is) into the compressed memory (FIFO of cmem_len), or
        dropped (XL). Every memory has its gradient stopped. -> (memory, reconstruction terms
        per layer or None)."""
        mems, mem_mask, cmems, cmem_mask = memory
        m, cm = self.mem_len, self.cmem_len
        full_mask = jnp.concatenate([mem_mask, mask], axis=1)
        new_mems, new_cmems = [], []
        out_mask = full_mask[:, full_mask.shape[1] - m:]
        conv = self.compression == "conv"
        terms = [] if (recon and cm and conv) else None
        if cm:
            gone_mask = full_mask[:, :full_mask.shape[1] - m]
            comp_mask = None
        for blk, mem, cmem, h in zip(self.blocks, mems, cmems, inputs):
            full = jnp.concatenate([mem, h], axis=1)
            new_mems.append(jax.lax.stop_gradient(full[:, full.shape[1] - m:]))
            if cm:
                gone = jax.lax.stop_gradient(full[:, :full.shape[1] - m])
                if conv:
                    comp, comp_mask = compress_conv(blk.compressor, gone, gone_mask,
                                                    self.compression_rate)
                else:
                    comp, comp_mask = compress_mean(gone, gone_mask, self.compression_rate)
                if terms is not None:
                    terms.append(reconstruction_terms(blk, h, mask, gone, gone_mask, comp,
                                                      comp_mask))
                new_cmems.append(jax.lax.stop_gradient(
                    jnp.concatenate([cmem, comp.astype(cmem.dtype)], axis=1)[:, -cm:]))
            else:
                new_cmems.append(cmem)
        if cm:
            cmem_mask = jnp.concatenate([cmem_mask, comp_mask], axis=1)[:, -cm:]
        return (new_mems, out_mask, new_cmems, cmem_mask), terms

    def states(self, tokens, mask, *, train: bool = False, rngs: nnx.Rngs | None = None,
               replace=None, replacement=None):
        """-> (x [B, T, E] after the final LayerNorm, mask [B, T]); as Encoder.states. In
        training with a convolution compressor (and recon_weight > 0) the reconstruction loss
        is left in self.recon_loss (an AuxLoss, popped by the training loop)."""
        b, t = tokens.shape
        rngs = dropout_rngs(rngs) if train else rngs   # Philox masks, as the encoder's
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
        recon = bool(train) and self.recon_weight > 0
        outs, sums, count = [], None, 0.0
        for i in range(n):
            y, memory, terms = self.segment(x[:, i * s:(i + 1) * s],
                                            padded[:, i * s:(i + 1) * s], memory,
                                            train=train, rngs=rngs, recon=recon)
            outs.append(y)
            if terms:
                layer_sums = jnp.stack([a for a, _ in terms])
                sums = layer_sums if sums is None else sums + layer_sums
                count = count + terms[0][1]          # the same queries count in every layer
        if recon:
            loss = (jnp.zeros(()) if sums is None
                    else jnp.sum(sums) / jnp.maximum(count, 1.0))
            self.recon_loss = AuxLoss(loss, weight=self.recon_weight)
        return self.norm(jnp.concatenate(outs, axis=1)[:, :t]), mask


def pop_aux_losses(model) -> dict:
    """{name: (value, weight)} of the AuxLoss variables the last call left in `model` (removed
    from it); {} when none."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.pop(model, AuxLoss)):
        name = str(path[-1])
        value, weight = var[...], float(var.get_metadata().get("weight", 1.0))
        out[name] = (value + out[name][0], weight) if name in out else (value, weight)
    return out
