"""Sparse Sinkhorn attention (Tay et al., 2020, sec. 3): the sequence is cut into blocks; a sort
net (2-layer MLP on each block's mean key, params) scores blocks, the scores / temperature are
made a soft permutation by Sinkhorn iterations (alternate row / column normalisation in log
space, eq. 5-6), and each query block attends to its own block and to its sorted block, the
permutation-weighted mix of key (value) blocks (eq. 7).

The sort net's output has one logit per block, so it is sized by the max length given to
init_state and sliced to the actual number of blocks. Padding: padded keys are zeroed before
blocks are mixed, all-padding blocks are left out of the permutation, and block means count
real keys only. Causal: block i's sort-net input is the mean of the keys before it, its
permutation row covers earlier blocks only and is normalised by rows alone (a column
normalisation would mix in later blocks' scores); its own block is causally masked.
Cost with a fixed block_size b: n b (attention) + n^2 / b (block mixing). block_size="sqrt":
b = ceil(sqrt(n)), n the max length given to init_state (the sort net then has b outputs and
fixes b), so the cost is O(n sqrt n), the paper's balance of the two terms.
Deviation from the paper (docs/faithfulness.md): no Gumbel noise on the sort logits in
training (the paper's Gumbel-Sinkhorn); an attention function here has no training flag, so
the sorting is the same in training and evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import Float, Int, register
from attention._buckets import attend
from attention._util import NEG_INF, check_causal, check_qkv, scale, sqrt_size

NAME = "sinkhorn"
HPARAMS = {"block_size": Int(64, min=1, sqrt=True), "sinkhorn_iters": Int(5, min=1),
           "temperature": Float(0.75, lo=1e-6, hi=1e6)}


def init_state(key, *, q_len, kv_len, num_heads, head_dim, block_size, **unused):
    """params: sort net sort_w1 [H, D, D], sort_b1 [H, D], sort_w2 [H, D, max blocks]
    (block_size="sqrt": ceil(sqrt(max length)) blocks of that size)."""
    del unused
    length = max(q_len, kv_len)
    max_blocks = sqrt_size(length) if block_size == "sqrt" else -(-length // block_size)
    k1, k2 = jax.random.split(key)
    d = head_dim
    return {
        "params": {
            "sort_w1": jax.random.normal(k1, (num_heads, d, d)) / jnp.sqrt(d),
            "sort_b1": jnp.zeros((num_heads, d)),
            "sort_w2": jax.random.normal(k2, (num_heads, d, max_blocks)) / jnp.sqrt(d),
        },
        "buffers": {},
    }


def _masked_lse(x, mask, axis):
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, x, NEG_INF), axis=axis, keepdims=True))
    s = jnp.sum(jnp.where(mask, jnp.exp(x - m), 0.0), axis=axis, keepdims=True)
    return jnp.where(s == 0, 0.0, m + jnp.log(jnp.where(s == 0, 1.0, s)))


def sinkhorn(logits, mask, iters: int, rows_only: bool = False):
    """Log-space Sinkhorn normalisation of logits [..., n, n] over entries where mask is True.
    -> soft permutation [..., n, n], zero where mask is False."""
    x = jnp.where(mask, logits, NEG_INF)
    if rows_only:
        x = x - _masked_lse(x, mask, axis=-1)
    else:
        def step(_, x):
            x = x - _masked_lse(x, mask, axis=-1)
            return x - _masked_lse(x, mask, axis=-2)
        x = jax.lax.fori_loop(0, iters, step, x)
    return jnp.where(mask, jnp.exp(x), 0.0)


@register(NAME, supports_causal=True, complexity="O(n^2/s)", init_state=init_state,
          hparams=HPARAMS,
          doc="Tay et al. 2020 (Sparse Sinkhorn): blocks + learned Sinkhorn-sorted block")
def sinkhorn_attention(q, k, v, *, kv_mask=None, causal=False, block_size, sinkhorn_iters,
                       temperature, sort_w1=None, sort_b1=None, sort_w2=None):
    """q, k, v: [B, T, H, D]; sort net params from init_state -> [B, T, H, Dv]."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    b, t, h, d = q.shape
    if k.shape[1] != t:
        raise ValueError(f"{NAME}: query and key blocks align, so q_len must equal kv_len; "
                         f"got {t}, {k.shape[1]}")
    if sort_w1 is None or sort_b1 is None or sort_w2 is None:
        raise ValueError(f"{NAME}: sort net params sort_w1, sort_b1, sort_w2 (from init_state) "
                         f"are required")
    bs = sort_w2.shape[-1] if block_size == "sqrt" else block_size
    nb = -(-t // bs)
    if sort_w2.shape[-1] < nb:
        raise ValueError(f"{NAME}: length {t} needs {nb} blocks of block_size={bs}, but the sort "
                         f"net was built for {sort_w2.shape[-1]} (max length given to "
                         f"init_state); rebuild it with a larger q_len/kv_len")
    pad = nb * bs - t
    mask = jnp.ones((b, t), bool) if kv_mask is None else kv_mask
    mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def blocks(x):  # [B, T, H, F] -> [B, H, nb, bs, F], float32
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2).reshape(b, h, nb, bs, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)            # [B, H, nb, bs, D]
    mb = mask.reshape(b, 1, nb, bs)                                # [B, 1, nb, bs]
    kz = jnp.where(mb[..., None], kb, 0.0)
    vz = jnp.where(mb[..., None], vb, 0.0)
    sums = jnp.sum(kz, axis=3)                                     # [B, H, nb, D]
    counts = jnp.sum(mb, axis=3).astype(jnp.float32)[..., None]    # [B, 1, nb, 1]
    block_real = counts[..., 0] > 0                                # [B, 1, nb]
    if causal:  # mean of the keys strictly before each block
        sums = jnp.cumsum(sums, axis=2) - sums
        counts = jnp.cumsum(counts, axis=2) - counts
    summary = sums / jnp.maximum(counts, 1.0)

    hidden = jax.nn.relu(jnp.einsum("bhnd,hde->bhne", summary, sort_w1.astype(jnp.float32))
                         + sort_b1.astype(jnp.float32)[None, :, None, :])
    logits = jnp.einsum("bhne,hem->bhnm", hidden,
                        sort_w2[..., :nb].astype(jnp.float32)) / temperature   # [B, H, nb, nb]
    if causal:
        allowed = (jnp.arange(nb)[None, :] < jnp.arange(nb)[:, None])[None, None] \
            & block_real[:, :, None, :]
    else:
        allowed = block_real[:, :, :, None] & block_real[:, :, None, :]
    perm = sinkhorn(logits, allowed, sinkhorn_iters, rows_only=causal)  # [B, H, nb, nb]

    ks = jnp.einsum("bhij,bhjtd->bhitd", perm, kz)                 # sorted blocks
    vs = jnp.einsum("bhij,bhjtd->bhitd", perm, vz)
    ms = jnp.einsum("bhij,bzjt->bhit", perm, mb.astype(jnp.float32)) > 0
    own = jnp.broadcast_to(mb[:, :, :, None, :], (b, h, nb, bs, bs))
    if causal:
        own = own & jnp.tril(jnp.ones((bs, bs), bool))
    key_mask = jnp.concatenate(
        [own, jnp.broadcast_to(ms[:, :, :, None, :], (b, h, nb, bs, bs))], axis=-1)
    keys = jnp.concatenate([kz, ks], axis=3)                       # [B, H, nb, 2bs, D]
    vals = jnp.concatenate([vz, vs], axis=3)
    scores = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, keys) * scale(d)
    out, _ = attend(scores, key_mask, vals)                        # [B, H, nb, bs, Dv]
    out = out.reshape(b, h, nb * bs, -1)[:, :, :t]
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)
