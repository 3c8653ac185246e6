"""ETC's relative position labels (Ainslie et al. 2020) in global-local attention
(`model.relative_labels=True` with `model.num_global_tokens > 0` and `attention.name=longformer`).

The sequence is [prefix; long tokens]: the prefix is CLS (pooling "cls") and the learned global
tokens, P positions. Pattern as on the longformer path: a prefix query attends to every key; a
long query to the long keys with abs(i - j) <= window and to every prefix key. Logits carry a
learned embedding of the pair's label on the key side (Shaw et al. 2018, as ETC does):

    s_ij = q_i . (k_j + a_label(i, j)) / sqrt(head_dim)
    label(i, j) = clip(j - i, -k, k)   long-long and prefix-prefix pairs (k = max_distance)
                = "long-to-global"     long query i, prefix key j
                = "global-to-long"     prefix query i, long key j

2k + 3 labels; `a` is a learned [2k + 3, head_dim] table per layer, shared by the heads (Shaw et
al. share it across heads). k is `model.relative_max_distance` (default 12, the value of ETC's
released configuration as we recall it, not checked here; pairs farther apart than k inside the
window share the clipped label).
Deviations from ETC: one set of q/k/v projections for all four pieces (ETC has separate ones
for global and long tokens), the global tokens are learned vectors (ETC derives them from the
input's structure, e.g. one per sentence, with hierarchical "part of" labels for global-to-long
pairs), and there is no CPC pretraining. Cost: long queries on banded blocks
(attention/_banded.py) plus the prefix keys, prefix queries as dense rows, and the label term as
q @ a^T [B, H, T, 2k + 3] gathered at the (static) labels of each pair: O(n * (window + P)),
never an n x n array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention import context_parallel, patterns
# the blocked machinery of the window patterns (the longformer variant's own building blocks)
from attention._banded import band, finish, prepare, unblock
from attention._blocks import (STATIC_MASK_LIMIT, Partial, merge, pad_axis, pair_mask,
                               to_blocks)
from attention._util import NEG_INF
from models.multihead import MultiHeadAttention


def num_labels(max_distance: int) -> int:
    """2k + 1 clipped distances, long-to-global, global-to-long."""
    return 2 * max_distance + 3


def labels(i, j, *, num_prefix: int, max_distance: int):
    """int32 label of each (query position i, key position j), broadcast. numpy positions give
    a numpy array (a constant of the program); jax positions a computed one."""
    xp = jnp if isinstance(i, jax.Array) or isinstance(j, jax.Array) else np
    k = max_distance
    gi, gj = i < num_prefix, j < num_prefix
    rel = xp.clip(j - i, -k, k) + k
    return xp.where(gi == gj, rel, xp.where(gj, 2 * k + 1, 2 * k + 2)).astype(np.int32)


def _static_labels(i, j, **kw):
    """labels of numpy positions; above STATIC_MASK_LIMIT pairs computed by XLA from the
    (linear-size) positions instead of folded into a large constant (as pair_mask does)."""
    if math.prod(np.broadcast_shapes(i.shape, j.shape)) > STATIC_MASK_LIMIT:
        i, j = jnp.asarray(i), jnp.asarray(j)
    return labels(i, j, **kw)


def _gather(qa, lab):
    """qa [B, H, G, Q, L] (q . a_l for every label), lab int [G, Q, K] -> [B, H, G, Q, K]."""
    g = np.arange(lab.shape[0])[:, None, None]
    r = np.arange(lab.shape[1])[None, :, None]
    return qa[:, :, g, r, lab]


def _partial(q, groups, *, dropout_rate, dropout_rng) -> Partial:
    """attention._blocks.partial_attention with an additive term on the logits: groups are
    (k, v, mask, qa) with qa [B, H, G, Q, K] = q . a_label of each pair (before scaling)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = jnp.promote_types(q.dtype, jnp.float32)     # float32, or float64 for float64 inputs
    logits = []
    for k, _, mask, qa in groups:
        spec = "bhgqd,bhgkd->bhgqk" if k.ndim == 5 else "bhgqd,bhkd->bhgqk"
        s = (jnp.einsum(spec, q, k, preferred_element_type=acc) + qa) * scale
        logits.append(jnp.where(mask, s, NEG_INF))
    m = logits[0].max(axis=-1)
    for s in logits[1:]:
        m = jnp.maximum(m, s.max(axis=-1))
    m = jax.lax.stop_gradient(m)
    keep = None
    if dropout_rate > 0.0 and dropout_rng is not None:  # one draw for all groups, as there
        sizes = [s.shape[-1] for s in logits]
        shape = jnp.broadcast_shapes(*(s.shape[:-1] for s in logits)) + (sum(sizes),)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, shape)
        keep = jnp.split(keep, list(np.cumsum(sizes)[:-1]), axis=-1)
    o = l = 0.0
    for n, (s, (_, v, mask, _)) in enumerate(zip(logits, groups)):
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        l = l + p.sum(axis=-1)
        if keep is not None:
            p = jnp.where(keep[n], p / (1.0 - dropout_rate), 0.0)
        spec = "bhgqk,bhgkd->bhgqd" if v.ndim == 5 else "bhgqk,bhkd->bhgqd"
        o = o + jnp.einsum(spec, p.astype(v.dtype), v, preferred_element_type=acc)
    return Partial(o, m, l)


def global_local_attention(q, k, v, rel, *, kv_mask=None, causal=False, window: int,
                           num_prefix: int, max_distance: int, dropout_rate: float = 0.0,
                           dropout_rng=None):
    """q, k, v: [B, T, H, D] (the first num_prefix positions global); rel: [2k + 3, D] label
    embeddings; kv_mask: bool [B, T]. -> [B, T, H, D]."""
    if rel.shape != (num_labels(max_distance), q.shape[-1]):
        raise ValueError(f"relative label table of shape {rel.shape}; expected "
                         f"{(num_labels(max_distance), q.shape[-1])}")
    qh, kh, vh, kvm = prepare("etc relative labels", q, k, v, kv_mask, causal)
    p = num_prefix
    lab = lambda i, j: _static_labels(i, j, num_prefix=p, max_distance=max_distance)  # noqa
    keep = lambda i, j: patterns.longformer(i, j, window=window, num_global=p)  # noqa: E731
    keys = [None, None] if not (dropout_rate and dropout_rng is not None) \
        else list(jax.random.split(dropout_rng, 2))
    qa = jnp.einsum("bhtd,ld->bhtl", qh, rel.astype(qh.dtype),
                    preferred_element_type=jnp.promote_types(qh.dtype, jnp.float32))  # [B,H,T,L]
    g = min(p, k.shape[1])
    # Long queries (and, replaced below, the prefix rows): window keys that are not prefix,
    # plus the prefix keys.
    qb, kb, vb, kvb, pos_q, pos_k = band(qh, kh, vh, kvm, window=window, causal=causal)
    nb, c = qb.shape[2], qb.shape[3]
    qab = to_blocks(pad_axis(qa, 2, nb * c), c, 2)                       # [B, H, nb, c, L]
    not_prefix = lambda i, j: keep(i, j) & (j >= g)  # noqa: E731
    groups = [(kb, vb, pair_mask(not_prefix, pos_q, pos_k, kvb, causal),
               _gather(qab, lab(pos_q[:, :, None], pos_k[:, None, :])))]
    if g > 0:
        gk = np.arange(g)
        groups.append((kh[:, :, :g], vh[:, :, :g], pair_mask(keep, pos_q, gk, kvm[:, :g], causal),
                       _gather(qab, lab(pos_q[:, :, None], gk[None, None, :]))))
    part = _partial(qb, groups, dropout_rate=dropout_rate, dropout_rng=keys[0])
    out = unblock(merge(part))                                      # [B, H, N, D]
    gq = min(p, q.shape[1])
    if gq > 0:
        # Prefix queries see every key: dense rows, O(P * n).
        rows, cols = np.arange(gq)[None], np.arange(k.shape[1])
        mask = pair_mask(keep, rows, cols, kvm, causal)
        bias = _gather(qa[:, :, None, :gq], lab(rows[:, :, None], cols[None, None, :]))
        part = _partial(qh[:, :, None, :gq], [(kh, vh, mask, bias)], dropout_rate=dropout_rate,
                        dropout_rng=keys[1])
        out = out.at[:, :, :gq].set(merge(part)[:, :, 0])
    return finish(out, q.shape[1], v.dtype)


class RelativeGlobalLocalAttention(MultiHeadAttention):
    """The block's attention with ETC's relative position labels: q/k/v/o projections as
    MultiHeadAttention (variant 'longformer', whose window and num_global = prefix it reads),
    plus the layer's label table `relative` [2k + 3, head_dim]."""

    def __init__(self, *, relative_max_distance: int, rngs: nnx.Rngs, **kwargs):
        super().__init__(rngs=rngs, **kwargs)
        if self.attention_name != "longformer":
            raise ValueError(f"model.relative_labels needs attention.name='longformer'; got "
                             f"{self.attention_name!r}")
        if not (isinstance(relative_max_distance, int) and relative_max_distance >= 1):
            raise ValueError(f"model.relative_max_distance must be an integer >= 1; got "
                             f"{relative_max_distance!r}")
        self.max_distance = relative_max_distance
        self.relative = nnx.Param(jax.random.normal(
            rngs.params(), (num_labels(relative_max_distance), self.head_dim)) * 0.02)

    def __call__(self, x, mask, *, train: bool = False, rngs: nnx.Rngs | None = None):
        """x: [B, T, emb]; mask: bool [B, T]. -> [B, T, emb]."""
        if context_parallel.seq_shards() > 1:
            raise ValueError("model.relative_labels has no context-parallel form; use "
                             "train.seq_shards=1")
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))  # [B, T, H, D]
        drop = {}
        if train and self.dropout_rate > 0 and rngs is not None:
            drop = {"dropout_rate": self.dropout_rate, "dropout_rng": rngs.dropout()}
        y = global_local_attention(
            q, k, v, self.relative[...], kv_mask=mask, causal=self.causal,
            window=self.hparams["window"], num_prefix=self.hparams["num_global"],
            max_distance=self.max_distance, **drop)
        return self.out(y.reshape(b, t, -1))
