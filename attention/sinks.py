"""Sliding window with attention sinks (StreamingLLM, Xiao et al. 2024), optionally with a
learned sink logit per head (as in recent open-weight models, e.g. gpt-oss).

Query i sees key j when abs(i - j) <= window or j < num_sink (the first num_sink positions are
seen by every query; causal: j <= i as well). Computed as banded blocks (attention/_banded.py)
over the non-sink keys plus the num_sink sink keys shared by all query blocks, in one softmax
with each pair counted once: O(n * (window + num_sink)), no n x n array.

learned_sink=True adds a virtual key per head: logit `sink[h]` (a param from init_state,
float32 [H], initialised to 0) and value 0. It joins every softmax row, so the weights of the
real keys sum to sigmoid(lse - sink) < 1 ("attention may go nowhere"); a row with no visible
real key still gets zeros.

Sink queries are ordinary queries (unlike longformer's global tokens they do not see every
key); the sink positions are absolute (StreamingLLM re-indexes positions inside its rolling
cache; here there is no cache and no position encoding inside the attention).

Pallas (attention/pallas/selected.py): the block-sparse flash kernel with this pattern's static
block lists; the learned sink rescales the kernel's rows by sigmoid(lse - sink).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention import Flag, Int, patterns, register
from attention._banded import band, finish, prepare, unblock
from attention._blocks import Partial, merge, pair_mask, partial_attention

NAME = "sliding_sink"


def sink_keep(i, j, *, window, num_sink):
    """The pattern: abs(i - j) <= window or j < num_sink (np, jnp or traced arrays)."""
    return patterns.local(i, j, window=window) | (j < num_sink)


def init_sink(key, *, q_len, kv_len, num_heads, head_dim, window, num_sink, learned_sink):
    """params: sink float32 [num_heads] (zeros) when learned_sink, else nothing."""
    del key, q_len, kv_len, head_dim, window, num_sink
    params = {"sink": jnp.zeros((num_heads,), jnp.float32)} if learned_sink else {}
    return {"params": params, "buffers": {}}


def check_sink(sink, learned_sink: bool, heads: int):
    if not learned_sink:
        return
    if sink is None or tuple(sink.shape) != (heads,):
        raise ValueError(f"{NAME}: learned_sink=True needs the param sink [num_heads={heads}] "
                         f"(from init_state); got "
                         f"{None if sink is None else tuple(sink.shape)}")


def sink_partial(sink, like: Partial) -> Partial:
    """The virtual sink key as softmax statistics shaped like `like` ([B, H, ...] rows):
    value 0 (o = 0), logit sink[h] (m = sink, l = exp(0) = 1)."""
    shape = like.m.shape
    m = jnp.broadcast_to(sink.astype(jnp.float32).reshape((1, -1) + (1,) * (len(shape) - 2)),
                         shape)
    return Partial(jnp.zeros_like(like.o), m, jnp.ones(shape, jnp.float32))


@register(NAME, supports_causal=True, complexity="O(n)", init_state=init_sink,
          supports_dropout=True,
          hparams={"window": Int(50, min=0), "num_sink": Int(4, min=0),
                   "learned_sink": Flag(False)},
          doc="Sliding window abs(i - j) <= window + the first num_sink positions as attention "
              "sinks, optional learned per-head sink logit (StreamingLLM, Xiao et al. 2024)")
def sliding_sink_attention(q, k, v, *, kv_mask=None, causal=False, window, num_sink,
                           learned_sink, sink=None, dropout_rate=0.0, dropout_rng=None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; kv_mask: bool [B, Tk]; sink: [H] when
    learned_sink. -> [B, Tq, H, Dv]."""
    qh, kh, vh, kvm = prepare(NAME, q, k, v, kv_mask, causal)
    check_sink(sink, learned_sink, q.shape[2])
    g = min(num_sink, k.shape[1])
    qb, kb, vb, kvb, pos_q, pos_k = band(qh, kh, vh, kvm, window=window, causal=causal)
    # Band keys that are not sinks, then the sink keys (shared by every query block).
    band_only = lambda i, j: patterns.local(i, j, window=window) & (j >= g)  # noqa: E731
    groups = [(kb, vb, pair_mask(band_only, pos_q, pos_k, kvb, causal))]
    if g > 0:
        every = lambda i, j: (i == i) & (j == j)  # noqa: E731
        groups.append((kh[:, :, :g], vh[:, :, :g],
                       pair_mask(every, pos_q, np.arange(g), kvm[:, :g], causal)))
    part = partial_attention(qb, groups, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    parts = [part, sink_partial(sink, part)] if learned_sink else [part]
    return finish(unblock(merge(*parts)), q.shape[1], v.dtype)
