"""Pallas paths of the part-3a variants on the block-sparse flash kernel (block_sparse.py).

  sliding_sink  the static layout of abs(i - j) <= window or j < num_sink (a Rule whose keep is
                that predicate: block lists and the in-kernel mask of partial tiles). The
                learned sink (a virtual key with value 0 and logit sink[h]) rescales each row:
                out = o * sigmoid(lse - sink), with lse the kernel's log-sum-exp; its gradient
                enters the kernel's backward through delta (delta - dL/dlse), passed as one
                extra value column (o's column = -dL/dlse, dO's = 1, v's = 0), so the kernels
                are used unchanged.
  mixture       each member's own kernel on its group of heads (every member needs one).

Not here: moba and nsa select key blocks per query token (the papers' gate), while the kernel's
lists are per query tile with a static in-kernel mask; a per-token selection needs a per-row
block mask inside the kernel, which block_sparse.py does not have. Their impl="pallas" is not
registered (ValueError naming the variants that have one).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from attention import register_pallas
from attention._util import check_causal, check_qkv
from attention.pallas import block_mask as bm
from attention.pallas import block_sparse as bs


@dataclasses.dataclass(frozen=True)
class SinkRule(bm.Rule):
    """keep(i, j) = abs(i - j) <= window or j < num_sink (and j <= i when causal)."""

    window: int = 0
    num_sink: int = 0

    @classmethod
    def make(cls, causal=False, *, window, num_sink):
        return cls(None, (), bool(causal), int(window), int(num_sink))

    def keep(self, i, j):
        keep = (abs(i - j) <= self.window) | (j < self.num_sink)
        return keep & (j <= i) if self.causal else keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sink_flash(cfg, dv, sink, q, k, v, kvm, kv_lists, q_lists):
    return _sink_fwd(cfg, dv, sink, q, k, v, kvm, kv_lists, q_lists)[0]


def _gate(lse2, sink):
    """sigmoid(lse - sink): [B, Tq, H] float32 from the kernel's base-2 lse [B, H, Tq]."""
    lse = jnp.swapaxes(lse2, 1, 2) / bs.LOG2E
    return jax.nn.sigmoid(lse - sink.astype(jnp.float32)[None, None, :])


def _sink_fwd(cfg, dv, sink, q, k, v, kvm, kv_lists, q_lists):
    o, lse2 = bs._forward(cfg, q, k, v, kvm, kv_lists)
    g = _gate(lse2, sink)
    out = (o.astype(jnp.float32) * g[..., None]).astype(o.dtype)
    return out, (sink, q, k, v, kvm, kv_lists, q_lists, o, lse2, g)


def _sink_bwd(cfg, dv, res, dy):
    sink, q, k, v, kvm, kv_lists, q_lists, o, lse2, g = res
    dy = dy.astype(jnp.float32)
    o32 = o.astype(jnp.float32)
    d_lse = jnp.sum(dy * o32, axis=-1) * g * (1.0 - g)  # dL/dlse [B, Tq, H]
    do = dy * g[..., None]
    # Column dv of v is zero (padding), so o's column dv is zero and free: delta =
    # rowsum(o * dO) - dL/dlse there, while dP = dO v^T is unchanged.
    o_aug = o32.at[..., dv].set(-d_lse).astype(o.dtype)
    do_aug = do.at[..., dv].set(1.0).astype(o.dtype)
    dq, dk, dv_ = bs._backward(cfg, q, k, v, kvm, kv_lists, q_lists, o_aug, lse2, do_aug)
    dsink = -jnp.sum(d_lse, axis=(0, 1)).astype(sink.dtype)
    return dsink, dq, dk, dv_, None, None, None


_sink_flash.defvjp(_sink_fwd, _sink_bwd)


def sink_flash_attention(q, k, v, *, sink, mask: bm.BlockMask, rule: bm.Rule, kv_mask=None,
                         interpret: bool = False):
    """block_sparse_attention plus the virtual sink key (logit sink[h], value 0)."""
    batch, q_len, heads, d = q.shape
    kv_len, dv = k.shape[1], v.shape[-1]
    bq, bk = mask.block_q, mask.block_k
    tq, tk = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    dp, dvp = bs._pow2_at_least(d), bs._pow2_at_least(dv + 1)  # one spare value column
    cfg = bs._Config(rule=rule, scale=1.0 / math.sqrt(d), block_q=bq, block_k=bk,
                     kv_len=kv_len, has_kv_mask=kv_mask is not None, interpret=interpret,
                     kv_contiguous=mask.kv_contiguous, q_contiguous=mask.q_contiguous,
                     check_len=tk != kv_len)
    qp = bs._pad_axis(bs._pad_axis(q, 1, tq), 3, dp)
    kp = bs._pad_axis(bs._pad_axis(k, 1, tk), 3, dp)
    vp = bs._pad_axis(bs._pad_axis(v, 1, tk), 3, dvp)
    kvm = None if kv_mask is None else bs._pad_axis(kv_mask.astype(jnp.int32), 1, tk)
    out = _sink_flash(cfg, dv, sink, qp, kp, vp, kvm, mask.kv_lists, mask.q_lists)
    return out[:, :q_len, :, :dv]


@register_pallas("sliding_sink")
def sliding_sink_attention(q, k, v, *, kv_mask=None, causal=False, window, num_sink,
                           learned_sink, sink=None, dropout_rate=0.0, dropout_rng=None,
                           block_q=None, block_k=None, interpret=None):
    """abs(i - j) <= window or j < num_sink on the block-sparse kernel (static lists)."""
    import attention
    from attention import sinks

    name = "sliding_sink"
    check_qkv(name, q, k, v, kv_mask)
    check_causal(name, causal, True, q.shape[1], k.shape[1])
    sinks.check_sink(sink, learned_sink, q.shape[2])
    hp = dict(window=window, num_sink=num_sink, learned_sink=learned_sink)
    if dropout_rate and dropout_rng is not None:  # no random numbers inside the kernel
        return attention.get(name).fn(q, k, v, kv_mask=kv_mask, causal=causal, sink=sink,
                                      dropout_rate=dropout_rate, dropout_rng=dropout_rng, **hp)
    interpret = bs.resolve_interpret(interpret, name)
    bq = bs.pick_block(block_q, q.shape[1], name, "block_q", interpret)
    bk = bs.pick_block(block_k, k.shape[1], name, "block_k", interpret)
    rule = SinkRule.make(causal, window=window, num_sink=num_sink)
    mask = bm.from_rule(rule, q.shape[1], k.shape[1], bq, bk, kv_mask)
    if not learned_sink:
        return bs.block_sparse_attention(q, k, v, mask=mask, rule=rule, kv_mask=kv_mask,
                                         interpret=interpret)
    return sink_flash_attention(q, k, v, sink=sink, mask=mask, rule=rule, kv_mask=kv_mask,
                                interpret=interpret)


@register_pallas("mixture")
def mixture_attention(q, k, v, *, kv_mask=None, causal=False, variants, member_hparams,
                      block_q=None, block_k=None, interpret=None, **state):
    """Each member's Pallas kernel on its group of heads (ValueError naming a member without
    one)."""
    from attention import mixture

    kernel = {key: val for key, val in
              dict(block_q=block_q, block_k=block_k, interpret=interpret).items()
              if val is not None}
    return mixture._run("pallas", q, k, v, kv_mask=kv_mask, causal=causal, variants=variants,
                        member_hparams=member_hparams, state=state, kernel=kernel)
