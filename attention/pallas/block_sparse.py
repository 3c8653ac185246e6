"""Block-sparse flash attention in Pallas: one kernel for every fixed pattern.

FlashAttention-2 (Dao, 2023, Alg. 1 and 2): the online softmax m_i = max(m_i, rowmax(S)),
l_i = e^(m_old - m_i) l_i + rowsum(P), O_i = e^(m_old - m_i) O_i + P V over key blocks, here only
over the key blocks that the pattern's block mask lists (FlexAttention-style lists, built in
block_mask.py). Full blocks run without a mask; partial blocks are masked in the kernel by the
pattern's own predicate keep(i, j) (attention/patterns.py), causality, the key length and
kv_mask. The backward pass (dQ, then dK/dV over the transposed lists) is two more Pallas
kernels wired through jax.custom_vjp.

Written for the GPU Triton lowering (grid + BlockSpecs; no scalar prefetch there, so the block
lists are ordinary inputs read inside the kernel); every program is independent of the others.
On a CPU the kernels run in Pallas interpret mode (slow: for tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import register_pallas
from attention._util import check_causal, check_int, check_qkv, or_sqrt
from attention.pallas import block_mask as bm

LOG2E = math.log2(math.e)
MASK = -1e30          # logit of a masked pair (finite: a fully masked row gives no NaN)
EMPTY_LSE = 1e30      # log-sum-exp stored for a row with no visible key: exp(s - lse) = 0
DEFAULT_BLOCK = 64
MIN_BLOCK = 16        # smallest tile a GPU dot takes


# ----------------------------------------------------------------------------------- interpret

_WARNED = []


def resolve_interpret(interpret, name: str) -> bool:
    """interpret=None: True on a CPU (warns once that this is slow), False on a GPU."""
    if interpret is not None:
        return bool(interpret)
    backend = jax.default_backend()
    if backend == "gpu":
        return False
    if backend == "cpu":
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn(
                "attention impl='pallas' on a CPU runs the Pallas kernels in interpret mode: "
                "correct but slow (meant for tests). Use impl='xla' for speed on a CPU.",
                stacklevel=3)
        return True
    raise ValueError(
        f"{name}: impl='pallas' kernels are written for the GPU Triton lowering; on "
        f"backend {backend!r} use impl='xla'")


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pick_block(requested, length: int, name: str, field: str, interpret: bool) -> int:
    """Power-of-two tile size: the request (default 64), shrunk for short sequences."""
    if requested is None:
        requested = DEFAULT_BLOCK
        requested = min(requested, max(MIN_BLOCK, _pow2_at_least(length)))
    check_int(name, field, requested, 1)
    if requested & (requested - 1):
        raise ValueError(f"{name}: {field} must be a power of two; got {requested}")
    if not interpret and requested < MIN_BLOCK:
        raise ValueError(f"{name}: {field} must be >= {MIN_BLOCK} on a GPU; got {requested}")
    return requested


# -------------------------------------------------------------------------------- the kernels


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call (hashable: a custom_vjp non-differentiable argument)."""

    rule: bm.Rule          # in-kernel mask of partial tiles
    scale: float           # softmax scale 1/sqrt(head_dim)
    block_q: int
    block_k: int
    kv_len: int            # real key length (keys past it are padding)
    has_kv_mask: bool
    interpret: bool
    kv_contiguous: bool = False  # lists hold consecutive blocks: step from the first entry
    q_contiguous: bool = False
    check_len: bool = True    # keys past kv_len exist (kv_len is not a multiple of block_k)
    num_warps: int | None = None
    num_stages: int | None = None


def _tile_keep(cfg: _Config, rows, cols, kv_valid, transposed=False):
    """bool keep mask of a partial tile: [len(rows), len(cols)] (rows: query positions), or
    [len(cols), len(rows)] when transposed (built that way: no transpose in the kernel)."""
    if transposed:
        i, j = rows[None, :], cols[:, None]
    else:
        i, j = rows[:, None], cols[None, :]
    keep = cfg.rule.keep(i, j)
    if cfg.check_len:
        inside = j < cfg.kv_len
        keep = inside if keep is None else keep & inside
    if kv_valid is not None:
        valid = (kv_valid[:, None] if transposed else kv_valid[None, :]) != 0
        keep = valid if keep is None else keep & valid
    shape = (cols.shape[0], rows.shape[0]) if transposed else (rows.shape[0], cols.shape[0])
    if keep is None:  # a partial tile always has a reason to be partial
        return jnp.ones(shape, bool)
    return jnp.broadcast_to(keep, shape)


def _block_id(contiguous: bool, lists_ref, t):
    """Block index of list entry t."""
    if contiguous:
        return lists_ref[bm.HEADER] + t
    return lists_ref[bm.HEADER + t]


def _fwd_kernel(lists_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
    # lists_ref: [2 + K]; q_ref: [bq, D]; k_ref, v_ref: [Tk, D]; kvm_ref: [Tk] (optional)
    # o_ref: [bq, Dv]; lse_ref: [bq] (base-2 log-sum-exp of the scaled logits)
    if cfg.has_kv_mask:
        kvm_ref, o_ref, lse_ref = refs
    else:
        kvm_ref = None
        o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    qb = pl.program_id(0)
    q = q_ref[...]
    rows = qb * bq + jnp.arange(bq, dtype=jnp.int32)
    c = cfg.scale * LOG2E

    def step(t, carry, masked):
        acc, m, l = carry
        kb = _block_id(cfg.kv_contiguous, lists_ref, t)
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = plgpu.dot(q, k, trans_b=True) * c  # [bq, bk] f32
        if masked:
            cols = start + jnp.arange(bk, dtype=jnp.int32)
            kv_valid = kvm_ref[pl.ds(start, bk)] if kvm_ref is not None else None
            keep = _tile_keep(cfg, rows, cols, kv_valid)
            s = jnp.where(keep, s, MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(keep, p, 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((bq,), MASK, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    num_full, num_listed = lists_ref[0], lists_ref[1]
    carry = jax.lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    carry = jax.lax.fori_loop(num_full, num_listed, functools.partial(step, masked=True), carry)
    acc, m, l = carry
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, EMPTY_LSE, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _dq_kernel(lists_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    # q_ref, do_ref: [bq, D]; k_ref, v_ref: [Tk, D]; lse_ref, delta_ref: [bq]; dq_ref: [bq, D]
    if cfg.has_kv_mask:
        kvm_ref, dq_ref = refs
    else:
        kvm_ref = None
        (dq_ref,) = refs
    bq, bk = cfg.block_q, cfg.block_k
    qb = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = qb * bq + jnp.arange(bq, dtype=jnp.int32)
    c = cfg.scale * LOG2E

    def step(t, dq, masked):
        kb = _block_id(cfg.kv_contiguous, lists_ref, t)
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = plgpu.dot(q, k, trans_b=True) * c
        p = jnp.exp2(s - lse[:, None])  # [bq, bk]
        if masked:
            cols = start + jnp.arange(bk, dtype=jnp.int32)
            kv_valid = kvm_ref[pl.ds(start, bk)] if kvm_ref is not None else None
            p = jnp.where(_tile_keep(cfg, rows, cols, kv_valid), p, 0.0)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(dq_ref.shape, jnp.float32)
    num_full, num_listed = lists_ref[0], lists_ref[1]
    dq = jax.lax.fori_loop(0, num_full, functools.partial(step, masked=False), dq)
    dq = jax.lax.fori_loop(num_full, num_listed, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(lists_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    # lists_ref: [2 + Kt] query blocks; k_ref, v_ref: [bk, D]; q_ref, do_ref: [Tq, D];
    # lse_ref, delta_ref: [Tq]; kvm_ref: [bk]; dk_ref, dv_ref: [bk, D]
    if cfg.has_kv_mask:
        kvm_ref, dk_ref, dv_ref = refs
        kv_valid = kvm_ref[...]
    else:
        kv_valid = None
        dk_ref, dv_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    kb = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    cols = kb * bk + jnp.arange(bk, dtype=jnp.int32)
    c = cfg.scale * LOG2E

    def step(t, carry, masked):
        dk, dv = carry
        qb = _block_id(cfg.q_contiguous, lists_ref, t)
        start = pl.multiple_of(qb * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        lse = lse_ref[pl.ds(start, bq)]
        delta = delta_ref[pl.ds(start, bq)]
        s_t = plgpu.dot(k, q, trans_b=True) * c  # [bk, bq]: transposed scores
        p_t = jnp.exp2(s_t - lse[None, :])
        if masked:
            rows = start + jnp.arange(bq, dtype=jnp.int32)
            keep_t = _tile_keep(cfg, rows, cols, kv_valid, transposed=True)  # [bk, bq]
            p_t = jnp.where(keep_t, p_t, 0.0)
        dv = dv + plgpu.dot(p_t.astype(do.dtype), do)
        dp_t = plgpu.dot(v, do, trans_b=True)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + plgpu.dot(ds_t.astype(q.dtype), q)
        return dk, dv

    carry = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    num_full, num_listed = lists_ref[0], lists_ref[1]
    carry = jax.lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    carry = jax.lax.fori_loop(num_full, num_listed, functools.partial(step, masked=True), carry)
    dk, dv = carry
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(cfg: _Config, head_dim: int):
    if cfg.interpret:
        return None
    num_warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages or 2)


def _list_spec(lists):
    """BlockSpec of one list row; lists [B', H', R, W], shared by the batch when B' == 1 and by
    the heads when H' == 1."""
    per_batch, per_head = lists.shape[0] > 1, lists.shape[1] > 1
    return pl.BlockSpec((None, None, None, lists.shape[-1]),
                        lambda r, b, h: (b if per_batch else 0, h if per_head else 0, r, 0))


def _forward(cfg: _Config, q, k, v, kvm, kv_lists):
    """q: [B, Tq, H, D], k, v: [B, Tk, H, D] padded to the blocks; -> (o, lse [B, H, Tq])."""
    batch, tq, heads, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    bq = cfg.block_q
    in_specs = [
        _list_spec(kv_lists),
        pl.BlockSpec((None, bq, None, d), lambda r, b, h: (b, r, h, 0)),
        pl.BlockSpec((None, tk, None, d), lambda r, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, tk, None, dv), lambda r, b, h: (b, 0, h, 0)),
    ]
    args = [kv_lists, q, k, v]
    if cfg.has_kv_mask:
        in_specs.append(pl.BlockSpec((None, tk), lambda r, b, h: (b, 0)))
        args.append(kvm)
    out_shape = [jax.ShapeDtypeStruct((batch, tq, heads, dv), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)]
    out_specs = [pl.BlockSpec((None, bq, None, dv), lambda r, b, h: (b, r, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, r))]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(tq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, d),
        interpret=cfg.interpret,
        name="block_sparse_flash_fwd",
    )(*args)


def _backward(cfg: _Config, q, k, v, kvm, kv_lists, q_lists, o, lse, do):
    batch, tq, heads, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    params = _compiler_params(cfg, d)

    in_specs = [
        _list_spec(kv_lists),
        pl.BlockSpec((None, bq, None, d), lambda r, b, h: (b, r, h, 0)),
        pl.BlockSpec((None, tk, None, d), lambda r, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, tk, None, dv), lambda r, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, bq, None, dv), lambda r, b, h: (b, r, h, 0)),
        pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, r)),
        pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, r)),
    ]
    args = [kv_lists, q, k, v, do, lse, delta]
    if cfg.has_kv_mask:
        in_specs.append(pl.BlockSpec((None, tk), lambda r, b, h: (b, 0)))
        args.append(kvm)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(tq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda r, b, h: (b, r, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="block_sparse_flash_dq",
    )(*args)

    in_specs = [
        _list_spec(q_lists),
        pl.BlockSpec((None, bk, None, d), lambda r, b, h: (b, r, h, 0)),
        pl.BlockSpec((None, bk, None, dv), lambda r, b, h: (b, r, h, 0)),
        pl.BlockSpec((None, tq, None, d), lambda r, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, tq, None, dv), lambda r, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, None, tq), lambda r, b, h: (b, h, 0)),
        pl.BlockSpec((None, None, tq), lambda r, b, h: (b, h, 0)),
    ]
    args = [q_lists, k, v, q, do, lse, delta]
    if cfg.has_kv_mask:
        in_specs.append(pl.BlockSpec((None, bk), lambda r, b, h: (b, r)))
        args.append(kvm)
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(tk // bk, batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, d), lambda r, b, h: (b, r, h, 0)),
                   pl.BlockSpec((None, bk, None, dv), lambda r, b, h: (b, r, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="block_sparse_flash_dkv",
    )(*args)
    return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, kvm, kv_lists, q_lists):
    return _forward(cfg, q, k, v, kvm, kv_lists)[0]


def _flash_fwd(cfg, q, k, v, kvm, kv_lists, q_lists):
    o, lse = _forward(cfg, q, k, v, kvm, kv_lists)
    return o, (q, k, v, kvm, kv_lists, q_lists, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, kvm, kv_lists, q_lists, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, kvm, kv_lists, q_lists, o, lse, do)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -------------------------------------------------------------------------------- entry point


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def block_sparse_attention(q, k, v, *, mask: bm.BlockMask, rule: bm.Rule, kv_mask=None,
                           interpret: bool = False, num_warps=None, num_stages=None):
    """softmax(q k^T / sqrt(d)) v over the pairs kept by `rule` (and kv_mask), visiting only the
    tiles listed in `mask`. q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; -> [B, Tq, H, Dv].

    mask must be built for (Tq, Tk, mask.block_q, mask.block_k) from the same rule (tiles the
    rule drops may be left out of mask; tiles it keeps must be listed).
    """
    batch, q_len, heads, d = q.shape
    kv_len, dv = k.shape[1], v.shape[-1]
    bq, bk = mask.block_q, mask.block_k
    tq, tk = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    dp, dvp = _pow2_at_least(d), _pow2_at_least(dv)
    cfg = _Config(rule=rule, scale=1.0 / math.sqrt(d), block_q=bq, block_k=bk, kv_len=kv_len,
                  has_kv_mask=kv_mask is not None, interpret=interpret,
                  kv_contiguous=mask.kv_contiguous, q_contiguous=mask.q_contiguous,
                  check_len=tk != kv_len,
                  num_warps=num_warps, num_stages=num_stages)
    # Zero padding: padded head dims add nothing to q.k; padded keys are masked; padded query
    # rows are sliced off.
    qp = _pad_axis(_pad_axis(q, 1, tq), 3, dp)
    kp = _pad_axis(_pad_axis(k, 1, tk), 3, dp)
    vp = _pad_axis(_pad_axis(v, 1, tk), 3, dvp)
    kvm = None
    if kv_mask is not None:
        kvm = _pad_axis(kv_mask.astype(jnp.int32), 1, tk)
    out = _flash(cfg, qp, kp, vp, kvm, mask.kv_lists, mask.q_lists)
    return out[:, :q_len, :, :dv]


# ------------------------------------------------------------------ the registered variants

_WARNED_DROPOUT = []


def _attend(name, q, k, v, *, kv_mask, causal, pattern, hparams, block_q, block_k, interpret,
            dropout_rate=0.0, dropout_rng=None, states=None, tile_divides=None):
    """Checks, then the block-sparse kernel for patterns.<pattern>(**hparams) (None: dense).

    states: optional fn(q_len, kv_len, block_q, block_k) -> (listed, full) [H', nq, nk] for
    patterns decided per tile outside the kernel (bigbird); the kernel then masks partial tiles
    by causality and padding only. tile_divides: default tiles divide this size.
    """
    import attention

    variant = attention.get(name)
    check_qkv(name, q, k, v, kv_mask)
    check_causal(name, causal, variant.supports_causal, q.shape[1], k.shape[1])
    if dropout_rate and dropout_rng is not None:
        # No random numbers inside the Triton kernel: attention dropout runs the XLA variant.
        if not _WARNED_DROPOUT:
            _WARNED_DROPOUT.append(True)
            warnings.warn(f"{name}: the Pallas kernel has no attention dropout; calls with "
                          f"dropout_rate > 0 run the XLA implementation", stacklevel=3)
        return variant.fn(q, k, v, kv_mask=kv_mask, causal=causal, dropout_rate=dropout_rate,
                          dropout_rng=dropout_rng, **hparams)
    interpret = resolve_interpret(interpret, name)
    if tile_divides is not None:  # the largest power of two dividing it, at most the default
        cap = min(DEFAULT_BLOCK, tile_divides & -tile_divides)
        block_q = min(cap, pick_block(None, q.shape[1], name, "block_q", True)) \
            if block_q is None else block_q
        block_k = min(cap, pick_block(None, k.shape[1], name, "block_k", True)) \
            if block_k is None else block_k
    bq = pick_block(block_q, q.shape[1], name, "block_q", interpret)
    bk = pick_block(block_k, k.shape[1], name, "block_k", interpret)
    if states is None:
        rule = bm.Rule.make(pattern, causal, **hparams)
        mask = bm.from_rule(rule, q.shape[1], k.shape[1], bq, bk, kv_mask)
    else:
        rule = bm.Rule.make(None, causal)
        listed, full = states(q.shape[1], k.shape[1], bq, bk)
        mask = bm.from_states(listed, full, bq, bk, k.shape[1], kv_mask)
    return block_sparse_attention(q, k, v, mask=mask, rule=rule, kv_mask=kv_mask,
                                  interpret=interpret)


@register_pallas("dense")
def dense_attention(q, k, v, *, kv_mask=None, causal=False, dropout_rate=0.0, dropout_rng=None,
                    block_q=None, block_k=None, interpret=None):
    """Dense softmax attention as flash attention (every tile listed, full unless masked)."""
    return _attend("dense", q, k, v, kv_mask=kv_mask, causal=causal, pattern=None, hparams={},
                   block_q=block_q, block_k=block_k, interpret=interpret,
                   dropout_rate=dropout_rate, dropout_rng=dropout_rng)


@register_pallas("local")
def local_attention(q, k, v, *, kv_mask=None, causal=False, window, dropout_rate=0.0,
                    dropout_rng=None, block_q=None, block_k=None, interpret=None):
    """abs(i - j) <= window; the tiles of the band."""
    return _attend("local", q, k, v, kv_mask=kv_mask, causal=causal, pattern="local",
                   hparams=dict(window=window), block_q=block_q, block_k=block_k,
                   interpret=interpret, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


@register_pallas("strided")
def strided_attention(q, k, v, *, kv_mask=None, causal=False, stride, dropout_rate=0.0,
                      dropout_rng=None, block_q=None, block_k=None, interpret=None):
    """(i - j) mod stride == 0. Every tile holds such a pair once stride <= block size, so the
    kernel saves nothing over dense there; it pays off for strides beyond the tile sizes.
    stride="sqrt": ceil(sqrt(max(Tq, Tk))), as the XLA variant."""
    check_qkv("strided", q, k, v, kv_mask)
    stride = or_sqrt(stride, max(q.shape[1], k.shape[1]))
    return _attend("strided", q, k, v, kv_mask=kv_mask, causal=causal, pattern="strided",
                   hparams=dict(stride=stride), block_q=block_q, block_k=block_k,
                   interpret=interpret, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


@register_pallas("sparse")
def sparse_attention(q, k, v, *, kv_mask=None, causal=False, window, stride,
                     dropout_rate=0.0, dropout_rng=None, block_q=None, block_k=None,
                     interpret=None):
    """abs(i - j) <= window or (i - j) mod stride == 0, in one softmax ("sqrt": as the XLA
    variant)."""
    check_qkv("sparse", q, k, v, kv_mask)
    n = max(q.shape[1], k.shape[1])
    window, stride = or_sqrt(window, n), or_sqrt(stride, n)
    return _attend("sparse", q, k, v, kv_mask=kv_mask, causal=causal, pattern="sparse",
                   hparams=dict(window=window, stride=stride), block_q=block_q,
                   block_k=block_k, interpret=interpret, dropout_rate=dropout_rate,
                   dropout_rng=dropout_rng)


@register_pallas("sparse_fixed")
def sparse_fixed_attention(q, k, v, *, kv_mask=None, causal=False, block_size, summary,
                           dropout_rate=0.0, dropout_rng=None, block_q=None, block_k=None,
                           interpret=None):
    """Own block of block_size, or j among the last `summary` positions of its block."""
    return _attend("sparse_fixed", q, k, v, kv_mask=kv_mask, causal=causal,
                   pattern="sparse_fixed", hparams=dict(block_size=block_size, summary=summary),
                   block_q=block_q, block_k=block_k, interpret=interpret,
                   dropout_rate=dropout_rate, dropout_rng=dropout_rng)


@register_pallas("longformer")
def longformer_attention(q, k, v, *, kv_mask=None, causal=False, window, num_global,
                         dropout_rate=0.0, dropout_rng=None, block_q=None, block_k=None,
                         interpret=None):
    """abs(i - j) <= window, or i or j among the first num_global positions."""
    return _attend("longformer", q, k, v, kv_mask=kv_mask, causal=causal, pattern="longformer",
                   hparams=dict(window=window, num_global=num_global), block_q=block_q,
                   block_k=block_k, interpret=interpret, dropout_rate=dropout_rate,
                   dropout_rng=dropout_rng)


@register_pallas("bigbird")
def bigbird_attention(q, k, v, *, kv_mask=None, causal=False, block_size, num_window_blocks,
                      num_global_blocks, num_random_blocks, random_layout=None,
                      dropout_rate=0.0, dropout_rng=None, block_q=None, block_k=None,
                      interpret=None):
    """Window, global and random blocks (per-head layout); kernel tiles divide block_size, so
    the lists come from the block-level predicate on the (possibly traced) layout."""
    heads, r = q.shape[2], num_random_blocks
    nb = -(-max(q.shape[1], k.shape[1]) // block_size)
    if r == 0:
        random_layout = jnp.full((heads, nb, 0), -1, jnp.int32)
    elif (random_layout is None or random_layout.ndim != 3 or random_layout.shape[0] != heads
          or random_layout.shape[1] < nb or random_layout.shape[2] != r):
        raise ValueError(
            f"bigbird: random_layout must be int [num_heads={heads}, >= num_blocks={nb}, "
            f"num_random_blocks={r}] (from init_state); got "
            f"{None if random_layout is None else tuple(random_layout.shape)}")
    states = functools.partial(
        bm.bigbird_states, block_size=block_size, num_window_blocks=num_window_blocks,
        num_global_blocks=num_global_blocks, random_layout=random_layout, causal=causal)
    hparams = dict(block_size=block_size, num_window_blocks=num_window_blocks,
                   num_global_blocks=num_global_blocks, num_random_blocks=num_random_blocks,
                   random_layout=random_layout)
    return _attend("bigbird", q, k, v, kv_mask=kv_mask, causal=causal, pattern=None,
                   hparams=hparams, block_q=block_q, block_k=block_k, interpret=interpret,
                   dropout_rate=dropout_rate, dropout_rng=dropout_rng, states=states,
                   tile_divides=block_size)
