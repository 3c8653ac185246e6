"""Pallas paths of the part-3a variants on the block-sparse flash kernel (block_sparse.py).

  sliding_sink  the static layout of abs(i - j) <= window or j < num_sink (a Rule whose keep is
                that predicate: block lists and the in-kernel mask of partial tiles). The
                learned sink (a virtual key with value 0 and logit sink[h]) rescales each row:
                out = o * sigmoid(lse - sink), with lse the kernel's log-sum-exp; its gradient
                enters the kernel's backward through delta (delta - dL/dlse), passed as one
                extra value column (o's column = -dL/dlse, dO's = 1, v's = 0), so the kernels
                are used unchanged (v is padded to the power of two above Dv: for Dv = 64 the
                value dots run at width 128 with the learned sink).
  mixture       each member's own kernel on its group of heads (every member needs one).

  moba          the per-token block selection (attention/moba.py's gate, computed in XLA):
                `sel` int32 [B, H, Tq, S], each query row's key blocks. The tile lists are the
                union over a query tile's rows (per batch and head, traced), and three kernels
                of the same FlashAttention-2 structure as block_sparse.py's mask each tile
                per row: row r keeps key block b iff b is in sel[r] (plus causality inside
                the own block, the key length and kv_mask). Kernel key tiles divide block_size,
                so a tile lies in one MoBA block. Same result as the XLA variant.

  nsa           the gated sum of its three branches: selected = the moba kernel above (the
                same gate and blocks), window = block_sparse's local kernel, compressed = the
                XLA branch (a dense softmax over n / block_size block tokens, no block
                structure to exploit).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

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


# ------------------------------------------------------------------------- moba: per-row lists


@dataclasses.dataclass(frozen=True)
class _RowConfig:
    scale: float
    block_q: int
    block_k: int
    block_size: int      # MoBA block: a multiple of block_k
    kv_len: int
    has_kv_mask: bool
    causal: bool
    check_len: bool
    interpret: bool


def _row_keep(cfg: _RowConfig, rows, cols, sel, kv_valid, start_k, transposed=False):
    """bool mask of a tile: row r keeps the tile's MoBA block iff it is among sel[r]; [bq, bk]
    (rows x cols) or [bk, bq] when transposed. sel: int32 [bq, S]."""
    blk = start_k // cfg.block_size
    row_ok = jnp.max((sel == blk).astype(jnp.int32), axis=1) > 0  # [bq]
    if transposed:
        i, j, keep = rows[None, :], cols[:, None], row_ok[None, :]
    else:
        i, j, keep = rows[:, None], cols[None, :], row_ok[:, None]
    if cfg.causal:
        keep = keep & (j <= i)
    if cfg.check_len:
        keep = keep & (j < cfg.kv_len)
    if kv_valid is not None:
        keep = keep & ((kv_valid[:, None] if transposed else kv_valid[None, :]) != 0)
    shape = (cols.shape[0], rows.shape[0]) if transposed else (rows.shape[0], cols.shape[0])
    return jnp.broadcast_to(keep, shape)


def _row_fwd_kernel(lists_ref, q_ref, k_ref, v_ref, sel_ref, *refs, cfg: _RowConfig):
    if cfg.has_kv_mask:
        kvm_ref, o_ref, lse_ref = refs
    else:
        kvm_ref = None
        o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    q, sel = q_ref[...], sel_ref[...]
    rows = pl.program_id(0) * bq + jnp.arange(bq, dtype=jnp.int32)
    c = cfg.scale * bs.LOG2E

    def step(t, carry):
        acc, m, l = carry
        start = pl.multiple_of(lists_ref[bm.HEADER + t] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        cols = start + jnp.arange(bk, dtype=jnp.int32)
        kv_valid = kvm_ref[pl.ds(start, bk)] if kvm_ref is not None else None
        keep = _row_keep(cfg, rows, cols, sel, kv_valid, start)
        s = jnp.where(keep, plgpu.dot(q, k, trans_b=True) * c, bs.MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(keep, jnp.exp2(s - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((bq,), bs.MASK, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, lists_ref[1], step, carry)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, bs.EMPTY_LSE, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _row_dq_kernel(lists_ref, q_ref, k_ref, v_ref, sel_ref, do_ref, lse_ref, delta_ref, *refs,
                   cfg: _RowConfig):
    if cfg.has_kv_mask:
        kvm_ref, dq_ref = refs
    else:
        kvm_ref = None
        (dq_ref,) = refs
    bq, bk = cfg.block_q, cfg.block_k
    q, sel, do = q_ref[...], sel_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = pl.program_id(0) * bq + jnp.arange(bq, dtype=jnp.int32)
    c = cfg.scale * bs.LOG2E

    def step(t, dq):
        start = pl.multiple_of(lists_ref[bm.HEADER + t] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        cols = start + jnp.arange(bk, dtype=jnp.int32)
        kv_valid = kvm_ref[pl.ds(start, bk)] if kvm_ref is not None else None
        keep = _row_keep(cfg, rows, cols, sel, kv_valid, start)
        p = jnp.where(keep, jnp.exp2(plgpu.dot(q, k, trans_b=True) * c - lse[:, None]), 0.0)
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, lists_ref[1], step, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _row_dkv_kernel(lists_ref, k_ref, v_ref, q_ref, sel_ref, do_ref, lse_ref, delta_ref, *refs,
                    cfg: _RowConfig):
    if cfg.has_kv_mask:
        kvm_ref, dk_ref, dv_ref = refs
        kv_valid = kvm_ref[...]
    else:
        kv_valid = None
        dk_ref, dv_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    k, v = k_ref[...], v_ref[...]
    start_k = pl.program_id(0) * bk
    cols = start_k + jnp.arange(bk, dtype=jnp.int32)
    c = cfg.scale * bs.LOG2E

    def step(t, carry):
        dk, dv = carry
        start = pl.multiple_of(lists_ref[bm.HEADER + t] * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        sel = sel_ref[pl.ds(start, bq), :]
        lse = lse_ref[pl.ds(start, bq)]
        delta = delta_ref[pl.ds(start, bq)]
        rows = start + jnp.arange(bq, dtype=jnp.int32)
        keep_t = _row_keep(cfg, rows, cols, sel, kv_valid, start_k, transposed=True)
        p_t = jnp.where(keep_t, jnp.exp2(plgpu.dot(k, q, trans_b=True) * c - lse[None, :]),
                        0.0)
        dv = dv + plgpu.dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (plgpu.dot(v, do, trans_b=True) - delta[None, :])
        dk = dk + plgpu.dot(ds_t.astype(q.dtype), q)
        return dk, dv

    carry = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, lists_ref[1], step, carry)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(cfg, d):
    if cfg.interpret:
        return None
    return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _row_spec(bq, width):  # [B, H, T, W] arrays, one tile of rows per program
    return pl.BlockSpec((None, None, bq, width), lambda r, b, h: (b, h, r, 0))


def _row_forward(cfg, q, k, v, sel, kvm, kv_lists):
    batch, tq, heads, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    bq = cfg.block_q
    in_specs = [bs._list_spec(kv_lists),
                pl.BlockSpec((None, bq, None, d), lambda r, b, h: (b, r, h, 0)),
                pl.BlockSpec((None, tk, None, d), lambda r, b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, tk, None, dv), lambda r, b, h: (b, 0, h, 0)),
                _row_spec(bq, sel.shape[-1])]
    args = [kv_lists, q, k, v, sel]
    if cfg.has_kv_mask:
        in_specs.append(pl.BlockSpec((None, tk), lambda r, b, h: (b, 0)))
        args.append(kvm)
    return pl.pallas_call(
        functools.partial(_row_fwd_kernel, cfg=cfg), grid=(tq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, dv), lambda r, b, h: (b, r, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, r))],
        out_shape=[jax.ShapeDtypeStruct((batch, tq, heads, dv), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)],
        compiler_params=_params(cfg, d), interpret=cfg.interpret, name="moba_flash_fwd",
    )(*args)


def _row_backward(cfg, q, k, v, sel, kvm, kv_lists, q_lists, o, lse, do):
    batch, tq, heads, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    bq, bk, s = cfg.block_q, cfg.block_k, sel.shape[-1]
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    in_specs = [bs._list_spec(kv_lists),
                pl.BlockSpec((None, bq, None, d), lambda r, b, h: (b, r, h, 0)),
                pl.BlockSpec((None, tk, None, d), lambda r, b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, tk, None, dv), lambda r, b, h: (b, 0, h, 0)),
                _row_spec(bq, s),
                pl.BlockSpec((None, bq, None, dv), lambda r, b, h: (b, r, h, 0)),
                pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, r)),
                pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, r))]
    args = [kv_lists, q, k, v, sel, do, lse, delta]
    if cfg.has_kv_mask:
        in_specs.append(pl.BlockSpec((None, tk), lambda r, b, h: (b, 0)))
        args.append(kvm)
    dq = pl.pallas_call(
        functools.partial(_row_dq_kernel, cfg=cfg), grid=(tq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda r, b, h: (b, r, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg, d), interpret=cfg.interpret, name="moba_flash_dq",
    )(*args)
    in_specs = [bs._list_spec(q_lists),
                pl.BlockSpec((None, bk, None, d), lambda r, b, h: (b, r, h, 0)),
                pl.BlockSpec((None, bk, None, dv), lambda r, b, h: (b, r, h, 0)),
                pl.BlockSpec((None, tq, None, d), lambda r, b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, None, tq, s), lambda r, b, h: (b, h, 0, 0)),
                pl.BlockSpec((None, tq, None, dv), lambda r, b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, None, tq), lambda r, b, h: (b, h, 0)),
                pl.BlockSpec((None, None, tq), lambda r, b, h: (b, h, 0))]
    args = [q_lists, k, v, q, sel, do, lse, delta]
    if cfg.has_kv_mask:
        in_specs.append(pl.BlockSpec((None, bk), lambda r, b, h: (b, r)))
        args.append(kvm)
    dk, dv_ = pl.pallas_call(
        functools.partial(_row_dkv_kernel, cfg=cfg), grid=(tk // bk, batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, d), lambda r, b, h: (b, r, h, 0)),
                   pl.BlockSpec((None, bk, None, dv), lambda r, b, h: (b, r, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg, d), interpret=cfg.interpret, name="moba_flash_dkv",
    )(*args)
    return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _row_flash(cfg, q, k, v, sel, kvm, kv_lists, q_lists):
    return _row_forward(cfg, q, k, v, sel, kvm, kv_lists)[0]


def _row_flash_fwd(cfg, q, k, v, sel, kvm, kv_lists, q_lists):
    o, lse = _row_forward(cfg, q, k, v, sel, kvm, kv_lists)
    return o, (q, k, v, sel, kvm, kv_lists, q_lists, o, lse)


def _row_flash_bwd(cfg, res, do):
    q, k, v, sel, kvm, kv_lists, q_lists, o, lse = res
    dq, dk, dv = _row_backward(cfg, q, k, v, sel, kvm, kv_lists, q_lists, o, lse, do)
    return dq, dk, dv, None, None, None, None


_row_flash.defvjp(_row_flash_fwd, _row_flash_bwd)


def row_tile_lists(sel, *, q_len_pad, kv_len, block_q, block_k, block_size, kv_mask=None):
    """BlockMask of per-row selections: a key tile is listed for a query tile iff some row of
    the tile selects its MoBA block (and, with kv_mask, the tile holds a real key); every
    listed tile is partial (masked per row in the kernel). sel: int32 [B, H, Tq_pad, S]."""
    nb = -(-kv_len // block_size)
    nq, nk = q_len_pad // block_q, -(-kv_len // block_k)
    b, h, tq, s = sel.shape
    # Scatter each row's blocks into its tile's row (-1 and out-of-range ids into a dummy
    # column): O(B H Tq S) indices, no [Tq, nb] one-hot.
    ids = jnp.where((sel >= 0) & (sel < nb), sel, nb)
    tile = jnp.broadcast_to((jnp.arange(tq) // block_q)[None, None, :, None], sel.shape)
    bi = jnp.broadcast_to(jnp.arange(b)[:, None, None, None], sel.shape)
    hi = jnp.broadcast_to(jnp.arange(h)[None, :, None, None], sel.shape)
    picked = jnp.zeros((b, h, nq, nb + 1), bool).at[bi, hi, tile, ids].set(True)[..., :nb]
    listed = jnp.repeat(picked, block_size // block_k, axis=-1)[..., :nk]
    if kv_mask is not None:
        kb_any, _ = bm.kv_block_states(kv_mask, kv_len, block_k)  # [B, nk]
        listed = listed & kb_any[:, None, None, :]
    none = jnp.zeros_like(listed)
    swap = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    return bm.BlockMask(bm.lists_from_states(listed, none, xp=jnp),
                        bm.lists_from_states(swap(listed), swap(none), xp=jnp),
                        block_q, block_k)


@register_pallas("moba")
def moba_attention(q, k, v, *, kv_mask=None, causal=False, block_size, top_k, block_q=None,
                   block_k=None, interpret=None):
    """MoBA with the gate in XLA and the attention in Pallas over each row's selected blocks.
    Default tiles: powers of two up to 64; block_k must divide block_size."""
    from attention import moba

    name = "moba"
    check_qkv(name, q, k, v, kv_mask)
    check_causal(name, causal, True, q.shape[1], k.shape[1])
    interpret = bs.resolve_interpret(interpret, name)
    cap = min(bs.DEFAULT_BLOCK, block_size & -block_size)  # largest power of two dividing it
    if block_k is None:
        block_k = min(cap, bs.pick_block(None, k.shape[1], name, "block_k", True))
    bq = bs.pick_block(block_q, q.shape[1], name, "block_q", interpret)
    bk = bs.pick_block(block_k, k.shape[1], name, "block_k", interpret)
    if block_size % bk:
        raise ValueError(f"{name} pallas: block_k={bk} must divide block_size={block_size} "
                         f"(a power of two dividing it; on a GPU >= {bs.MIN_BLOCK})")
    batch, q_len, heads, d = q.shape
    kv_len, dv = k.shape[1], v.shape[-1]
    sel = moba.block_lists(q, k, kv_mask=kv_mask, causal=causal, block_size=block_size,
                           top_k=top_k)  # [B, H, Tq, S]
    s = bs._pow2_at_least(sel.shape[-1])
    tq, tk = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    sel = jnp.pad(sel, ((0, 0), (0, 0), (0, tq - q_len), (0, s - sel.shape[-1])),
                  constant_values=-1)
    mask = row_tile_lists(sel, q_len_pad=tq, kv_len=kv_len, block_q=bq, block_k=bk,
                          block_size=block_size, kv_mask=kv_mask)
    cfg = _RowConfig(scale=1.0 / math.sqrt(d), block_q=bq, block_k=bk, block_size=block_size,
                     kv_len=kv_len, has_kv_mask=kv_mask is not None, causal=bool(causal),
                     check_len=tk != kv_len, interpret=interpret)
    dp, dvp = bs._pow2_at_least(d), bs._pow2_at_least(dv)
    qp = bs._pad_axis(bs._pad_axis(q, 1, tq), 3, dp)
    kp = bs._pad_axis(bs._pad_axis(k, 1, tk), 3, dp)
    vp = bs._pad_axis(bs._pad_axis(v, 1, tk), 3, dvp)
    kvm = None if kv_mask is None else bs._pad_axis(kv_mask.astype(jnp.int32), 1, tk)
    out = _row_flash(cfg, qp, kp, vp, sel, kvm, mask.kv_lists, mask.q_lists)
    return out[:, :q_len, :, :dv]


@register_pallas("nsa")
def nsa_attention(q, k, v, *, kv_mask=None, causal=False, block_size, top_k, window,
                  gate_w=None, gate_b=None, block_q=None, block_k=None, interpret=None):
    """Gates from q; selected branch on the moba kernel, window branch on the local kernel,
    compressed branch in XLA."""
    import attention
    from attention import nsa

    name = "nsa"
    check_qkv(name, q, k, v, kv_mask)
    check_causal(name, causal, True, q.shape[1], k.shape[1])
    g = nsa.gates(q, gate_w, gate_b)
    kernel = dict(block_q=block_q, interpret=interpret)
    cmp = nsa.compressed_branch(q, k, v, kv_mask=kv_mask, causal=causal,
                                block_size=block_size)
    slc = moba_attention(q, k, v, kv_mask=kv_mask, causal=causal, block_size=block_size,
                         top_k=top_k, block_k=block_k, **kernel)
    win = attention.PALLAS["local"](q, k, v, kv_mask=kv_mask, causal=causal, window=window,
                                    block_k=block_k, **kernel)
    out = sum(g[..., n, None] * o.astype(jnp.float32) for n, o in enumerate((cmp, slc, win)))
    return out.astype(v.dtype)
