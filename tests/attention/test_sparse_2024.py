"""sliding_sink, moba, nsa, mixture against float64 references.

References are dense numpy float64 computations of each variant's rule (the masks written out
pair by pair, the block selections recomputed independently); the variants run in float32.
Padding, causality, gradients, cost growth and the no-n x n check come from the registry-wide
tests (tests/attention/cases.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from tests.attention.compile_options import FAST_COMPILE

pytestmark = pytest.mark.usefixtures("fast_compile")  # small shapes: compile time dominates

TOL = 2e-5


def _inputs(seed, b, n, h, d, kv_lens=None):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
    mask = None
    if kv_lens is not None:
        mask = np.arange(n)[None, :] < np.asarray(kv_lens)[:, None]
    return q, k, v, mask


def _softmax_rows(logits, keep, sink=None):
    """float64 softmax of logits [..., K] over `keep`; sink: an extra logit with value 0.
    Rows with nothing kept (and no sink) -> zero weights."""
    s = np.where(keep, logits, -np.inf)
    if sink is not None:
        s = np.concatenate([s, np.broadcast_to(sink, s.shape[:-1])[..., None]], axis=-1)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    w = e / np.where(den == 0, 1.0, den)
    return w[..., :keep.shape[-1]]


def _dense_ref(q, k, v, keep):
    """keep: bool [B, H, Tq, Tk] -> out [B, Tq, H, Dv] float64."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = _softmax_rows(logits, keep)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _pair_mask(n, kv_mask, causal, keep_ij, b, h):
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    keep = np.broadcast_to(keep_ij(i, j), (n, n)).copy()
    if causal:
        keep &= j <= i
    keep = np.broadcast_to(keep, (b, h, n, n)).copy()
    if kv_mask is not None:
        keep &= kv_mask[:, None, None, :]
    return keep


# ---------------------------------------------------------------------------- sliding_sink


def test_sliding_sink_matches_float64_reference():
    """Causal and not, with and without the learned sink, with padding (a padded sink)."""
    b, n, h, d = 2, 37, 3, 8
    window, num_sink = 5, 3
    q, k, v, kv_mask = _inputs(1, b, n, h, d, kv_lens=(n, 22))
    kv_mask[1, 1] = False  # a padded sink position
    sink = np.array([0.7, -1.5, 3.0], np.float32)
    cases = [(causal, learned) for causal in (False, True) for learned in (False, True)]
    variant = attention.get("sliding_sink")
    outs = jax.jit(lambda q, k, v, m, s: [
        variant(q, k, v, kv_mask=m, causal=causal, window=window, num_sink=num_sink,
                learned_sink=learned, **({"sink": s} if learned else {}))
        for causal, learned in cases], compiler_options=FAST_COMPILE)(
        q, k, v, jnp.asarray(kv_mask), jnp.asarray(sink))
    qd, kd, vd = (x.astype(np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", qd, kd) / np.sqrt(d)
    for (causal, learned), out in zip(cases, outs):
        keep = _pair_mask(n, kv_mask, causal,
                          lambda i, j: (np.abs(i - j) <= window) | (j < num_sink), b, h)
        w = _softmax_rows(logits, keep,
                          sink.astype(np.float64)[None, :, None] if learned else None)
        ref = np.einsum("bhqk,bkhd->bqhd", w, vd)
        np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=TOL,
                                   err_msg=f"causal={causal} learned={learned}")
        if learned:  # the sink really takes weight: rows sum below 1
            assert w.sum(-1)[0].max() < 1 - 1e-3
        # the pattern is not degenerate: sinks outside the window are used
        assert keep[0, 0, n - 1, 0] and not keep[0, 0, n - 1, num_sink]


def test_sliding_sink_state_and_errors():
    st = attention.get("sliding_sink").init_state(jax.random.key(0), q_len=8, kv_len=8,
                                                  num_heads=3, head_dim=4, learned_sink=True)
    assert st["params"]["sink"].shape == (3,)
    assert attention.get("sliding_sink").init_state(
        jax.random.key(0), q_len=8, kv_len=8, num_heads=3, head_dim=4)["params"] == {}
    q = np.zeros((1, 8, 3, 4), np.float32)
    with pytest.raises(ValueError, match="sink"):
        attention.get("sliding_sink")(q, q, q, learned_sink=True)


# ------------------------------------------------------------------------------------ moba


def _moba_keep(q, k, kv_mask, c, top_k, causal):
    """float64 reference of MoBA's pairs: bool [B, H, n, n], selected independently (numpy
    sort; ties to the lower block)."""
    b, n, h, _ = q.shape
    nb = -(-n // c)
    kvm = np.ones((b, n), bool) if kv_mask is None else kv_mask
    keep = np.zeros((b, h, n, n), bool)
    for bb in range(b):
        for hh in range(h):
            means, real = [], []
            for blk in range(nb):
                sl = slice(blk * c, min(n, (blk + 1) * c))
                r = kvm[bb, sl]
                real.append(r.any())
                means.append(k[bb, sl, hh][r].astype(np.float64).mean(0) if r.any()
                             else np.zeros(k.shape[-1]))
            for i in range(n):
                own = i // c
                cand = [m for m in range(nb) if real[m] and (m < own if causal else m != own)]
                score = {m: float(q[bb, i, hh].astype(np.float64) @ means[m]) for m in cand}
                chosen = sorted(cand, key=lambda m: (-score[m], m))[:top_k - 1] + [own]
                for m in chosen:
                    keep[bb, hh, i, m * c:(m + 1) * c] = True
    keep &= kvm[:, None, None, :]
    if causal:
        keep &= np.tril(np.ones((n, n), bool))
    return keep


MOBA_TOP_K = (1, 8, 20, 3)


@pytest.mark.parametrize("causal", [True, False])
def test_moba_limits_and_intermediate_top_k(causal):
    b, n, h, d, c = 2, 38, 2, 8, 5   # 8 blocks, the last one partial
    q, k, v, kv_mask = _inputs(2, b, n, h, d, kv_lens=(n, 23))
    kv_mask[1, 10:15] = False        # a block with no real key in row 1: never selected
    moba = attention.get("moba")
    outs = jax.jit(lambda q, k, v, m: [moba(q, k, v, kv_mask=m, causal=causal, block_size=c,
                                            top_k=t) for t in MOBA_TOP_K],
                   compiler_options=FAST_COMPILE)(q, k, v, jnp.asarray(kv_mask))
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    own_only = np.broadcast_to((i // c == j // c), (b, h, n, n)) & kv_mask[:, None, None]
    if causal:
        own_only = own_only & (j <= i)
    dense = _pair_mask(n, kv_mask, causal, lambda i, j: i == i, b, h)
    for top_k, keep, out in zip(MOBA_TOP_K, (own_only, dense, dense,
                                            _moba_keep(q, k, kv_mask, c, 3, causal)), outs):
        np.testing.assert_allclose(np.asarray(out), _dense_ref(q, k, v, keep), atol=TOL,
                                   rtol=TOL, err_msg=f"top_k={top_k}")
    keep3 = _moba_keep(q, k, kv_mask, c, 3, causal)
    assert (keep3 != own_only).any() and (keep3 != dense).any()  # not degenerate
    # the selection really is data dependent: queries of one block pick different blocks
    rows = keep3[0, 0, 30:35].reshape(5, -1)
    assert len({r.tobytes() for r in rows}) > 1


# --------------------------------------------------------------------------------- mixture


def test_mixture_equals_its_members_on_their_head_groups():
    b, n, h, d = 2, 30, 6, 8
    q, k, v, kv_mask = _inputs(3, b, n, h, d, kv_lens=(n, 17))
    mix = attention.get("mixture")
    hp = {"variants": "local,sliding_sink,moba",
          "member_hparams": "local.window=3,sliding_sink.window=2,sliding_sink.num_sink=2,"
                            "sliding_sink.learned_sink=true,moba.block_size=4,moba.top_k=2"}
    st = mix.init_state(jax.random.key(0), q_len=n, kv_len=n, num_heads=h, head_dim=d, **hp)
    assert set(st["params"]) == {"m1_sliding_sink_sink"}
    st = {"m1_sliding_sink_sink": jnp.array([0.5, -2.0])}  # per-head values of the group
    mask = jnp.asarray(kv_mask)
    members = [("local", {"window": 3}, {}),
               ("sliding_sink", {"window": 2, "num_sink": 2, "learned_sink": True},
                {"sink": st["m1_sliding_sink_sink"]}),
               ("moba", {"block_size": 4, "top_k": 2}, {})]

    def run(q, k, v):
        res = []
        for causal in (False, True):
            out = mix(q, k, v, kv_mask=mask, causal=causal, **hp, **st)
            refs = [attention.get(name)(q[:, :, 2 * i:2 * i + 2], k[:, :, 2 * i:2 * i + 2],
                                        v[:, :, 2 * i:2 * i + 2], kv_mask=mask, causal=causal,
                                        **mhp, **arrays)
                    for i, (name, mhp, arrays) in enumerate(members)]
            other = attention.get("local")(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], kv_mask=mask,
                                           causal=causal, window=3)
            res.append((out, refs, other))
        return res

    for out, refs, other in jax.jit(run, compiler_options=FAST_COMPILE)(q, k, v):
        for i, ref in enumerate(refs):
            np.testing.assert_array_equal(np.asarray(out[:, :, 2 * i:2 * i + 2]),
                                          np.asarray(ref))
        # the groups really differ: moba's heads are not what local would give
        assert np.abs(np.asarray(out[:, :, 4:]) - np.asarray(other)).max() > 1e-3


def test_mixture_errors():
    q = np.zeros((1, 12, 3, 4), np.float32)
    mix = attention.get("mixture")
    with pytest.raises(ValueError, match="3 heads cannot be split into 2"):
        mix(q, q, q)
    with pytest.raises(ValueError, match="Unrecognized attention variant"):
        mix(q, q, q, variants="local,nope,strided")
    with pytest.raises(ValueError, match="update_buffers"):
        mix(q, q, q, variants="routing,local,strided")
    with pytest.raises(ValueError, match="model supplies"):
        mix(q, q, q, variants="axial,local,strided")
    with pytest.raises(ValueError, match="not in variants"):
        mix(q, q, q, variants="local,strided,dense", member_hparams="moba.top_k=2")
    with pytest.raises(ValueError, match="member.key=value"):
        mix(q, q, q, member_hparams="window=3")
    with pytest.raises(ValueError, match="window"):
        mix(q, q, q, variants="local,strided,dense", member_hparams="local.window=-1")


# ------------------------------------------------------------------------------------- nsa


def _nsa_compressed_ref(q, k, v, kv_mask, c, causal):
    """float64: one token per block (mean of its real keys / values), causal: complete
    blocks only."""
    b, n, h, d = q.shape
    nb = -(-n // c)
    out = np.zeros((b, n, h, v.shape[-1]))
    for bb in range(b):
        toks = []
        for blk in range(nb):
            sl = slice(blk * c, min(n, (blk + 1) * c))
            r = kv_mask[bb, sl]
            if r.any():
                toks.append((blk, k[bb, sl][r].astype(np.float64).mean(0),
                             v[bb, sl][r].astype(np.float64).mean(0)))
        for i in range(n):
            vis = [t for t in toks if not causal or (t[0] + 1) * c - 1 <= i]
            if not vis:
                continue
            kc = np.stack([t[1] for t in vis])  # [T, H, D]
            vc = np.stack([t[2] for t in vis])
            s = np.einsum("hd,thd->ht", q[bb, i].astype(np.float64), kc) / np.sqrt(d)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[bb, i] = np.einsum("ht,thd->hd", w, vc)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_nsa_branches_and_gates_match_float64_references(causal):
    from attention import nsa

    b, n, h, d, c, top_k, window = 2, 35, 2, 8, 4, 3, 3
    q, k, v, kv_mask = _inputs(4, b, n, h, d, kv_lens=(n, 21))
    kv_mask[1, 4:8] = False  # a block with no real key
    hp = dict(block_size=c, top_k=top_k, window=window)
    st = attention.get("nsa").init_state(jax.random.key(1), q_len=n, kv_len=n, num_heads=h,
                                         head_dim=d, **hp)["params"]
    st["gate_b"] = jnp.array([[1.0, -1.0, 0.0], [0.0, 2.0, -2.0]])
    mask = jnp.asarray(kv_mask)
    run = jax.jit(lambda q, k, v, st: (
        nsa.branches(q, k, v, kv_mask=mask, causal=causal, **hp),
        attention.get("nsa")(q, k, v, kv_mask=mask, causal=causal, **hp, **st)),
        compiler_options=FAST_COMPILE)
    (cmp, slc, win), out = run(q, k, v, st)
    refs = [_nsa_compressed_ref(q, k, v, kv_mask, c, causal),
            _dense_ref(q, k, v, _moba_keep(q, k, kv_mask, c, top_k, causal)),
            _dense_ref(q, k, v, _pair_mask(n, kv_mask, causal,
                                           lambda i, j: np.abs(i - j) <= window, b, h))]
    for got, ref, what in zip((cmp, slc, win), refs, nsa.BRANCHES):
        np.testing.assert_allclose(np.asarray(got), ref, atol=TOL, rtol=TOL, err_msg=what)
    for x, y in ((0, 1), (0, 2), (1, 2)):  # three different branches
        assert np.abs(refs[x] - refs[y]).max() > 1e-2
    w, bias = (np.asarray(st[x], np.float64) for x in ("gate_w", "gate_b"))
    g = 1 / (1 + np.exp(-(np.einsum("bthd,hdg->bthg", q.astype(np.float64), w) + bias)))
    ref = sum(g[..., i, None] * r for i, r in enumerate(refs))
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=TOL)
    if causal:  # the first block has no complete block before it: compressed branch is empty
        np.testing.assert_array_equal(np.asarray(cmp)[:, :c - 1], 0.0)


# ---------------------------------------------------------------------------------- pallas


@pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")
def test_sliding_sink_pallas_matches_xla():
    """Causal with the learned sink: outputs and gradients (q, k, v, sink); not causal without
    it: outputs. Lengths not multiples of the tiles, one padded example."""
    b, n, h, d = 2, 45, 2, 16
    q, k, v, kv_mask = _inputs(5, b, n, h, d, kv_lens=(n, 29))
    ct = _inputs(6, b, n, h, d)[0]
    mask = jnp.asarray(kv_mask)
    kernel = {"block_q": 16, "block_k": 8, "interpret": True}
    hp = dict(window=5, num_sink=3)
    variant = attention.get("sliding_sink")

    def run(q, k, v, ct, sink):
        res = []
        for impl, extra in (("pallas", kernel), ("xla", {})):
            fn = lambda q, k, v, s: variant(q, k, v, impl=impl, kv_mask=mask,  # noqa: E731
                                            causal=True, learned_sink=True, sink=s, **hp,
                                            **extra)
            out, vjp = jax.vjp(fn, q, k, v, sink)
            plain = variant(q, k, v, impl=impl, kv_mask=mask, causal=False,
                            learned_sink=False, **hp, **extra)
            res.append((out, vjp(ct), plain))
        return res

    (out, grads, plain), (out_x, grads_x, plain_x) = jax.jit(
        run, compiler_options=FAST_COMPILE)(q, k, v, ct, jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_x), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(plain_x), atol=TOL, rtol=TOL)
    for g, gx, what in zip(grads, grads_x, ("q", "k", "v", "sink")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(gx), atol=5e-5, rtol=5e-5,
                                   err_msg=f"d{what}")
    assert float(jnp.abs(grads_x[3]).max()) > 1e-3
    # the layout skips tiles: key tile 3 (24..31) is neither sink nor window for query tile 0
    from attention.pallas import block_mask, selected
    for causal in (False, True):
        rule = selected.SinkRule.make(causal, window=5, num_sink=3)
        listed, _ = block_mask.block_states(rule, n, n, 16, 8)
        assert not listed[0, 3] and listed[2, 0]


@pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")
def test_mixture_pallas_is_the_members_kernels():
    """sliding_sink's kernel on its heads, nystrom (no kernel) through its XLA function with a
    warning (so impl="auto" works on a GPU): equal to the XLA mixture."""
    from attention import mixture

    b, n, h, d = 2, 24, 2, 16
    q, k, v, kv_mask = _inputs(7, b, n, h, d, kv_lens=(n, 15))
    hp = {"variants": "sliding_sink,nystrom",
          "member_hparams": "sliding_sink.window=2,sliding_sink.num_sink=2,"
                            "nystrom.num_landmarks=4"}
    mix = attention.get("mixture")
    mask = jnp.asarray(kv_mask)
    mixture._WARNED.clear()
    with pytest.warns(UserWarning, match="'nystrom' has no Pallas kernel"):
        out, out_x = jax.jit(lambda q, k, v: [
            mix(q, k, v, kv_mask=mask, impl=impl, **hp, **kw)
            for impl, kw in (("pallas", {"block_q": 16, "block_k": 16, "interpret": True}),
                             ("xla", {}))], compiler_options=FAST_COMPILE)(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_x), atol=TOL, rtol=TOL)


@pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")
def test_moba_pallas_matches_xla():
    """Per-row block selection in the kernel: outputs and dq/dk/dv against the XLA variant,
    causal (top_k 2 of 4 blocks, key tiles smaller than the blocks), and the non-causal
    forward; one padded example, a length that is not a multiple of the tiles."""
    b, n, h, d = 2, 29, 2, 16
    q, k, v, kv_mask = _inputs(8, b, n, h, d, kv_lens=(n, 19))
    ct = _inputs(9, b, n, h, d)[0]
    mask = jnp.asarray(kv_mask)
    moba = attention.get("moba")
    hp = {"block_size": 8, "top_k": 2}

    def run(q, k, v, ct):
        res = []
        for impl, extra in (("pallas", {"block_q": 8, "block_k": 4, "interpret": True}),
                            ("xla", {})):
            fn = lambda q, k, v: moba(q, k, v, impl=impl, kv_mask=mask,  # noqa: E731
                                      causal=True, **hp, **extra)
            out, vjp = jax.vjp(fn, q, k, v)
            plain = moba(q, k, v, impl=impl, kv_mask=mask, causal=False, **hp, **extra)
            res.append((out, vjp(ct), plain))
        return res

    (out, grads, plain), (out_x, grads_x, plain_x) = jax.jit(
        run, compiler_options=FAST_COMPILE)(q, k, v, ct)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_x), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(plain_x), atol=TOL, rtol=TOL)
    for g, gx, what in zip(grads, grads_x, "qkv"):
        np.testing.assert_allclose(np.asarray(g), np.asarray(gx), atol=5e-5, rtol=5e-5,
                                   err_msg=f"d{what}")
    # the lists are data dependent: each query tile lists exactly the union of its rows'
    # selected blocks, and rows of one tile select different blocks
    from attention import moba as moba_mod
    from attention.pallas import selected
    sel = np.asarray(moba_mod.block_lists(q, k, kv_mask=mask, causal=True, block_size=8,
                                          top_k=2))
    assert len(set(sel[0, 0, 24:29, 1])) > 1
    padded = jnp.pad(jnp.asarray(sel), ((0, 0), (0, 0), (0, 3), (0, 0)), constant_values=-1)
    lists = np.asarray(selected.row_tile_lists(padded, q_len_pad=32, kv_len=n, block_q=8,
                                               block_k=8, block_size=8).kv_lists)
    for bb in range(b):
        for hh in range(h):
            for t in range(4):
                union = set(sel[bb, hh, 8 * t:8 * t + 8].ravel()) - {-1}
                got = lists[bb, hh, t]
                assert got[0] == 0 and set(got[2:2 + got[1]]) == union, (bb, hh, t)


@pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")
def test_nsa_pallas_matches_xla():
    """Gated sum of the compressed branch (XLA), the moba kernel and the local kernel equals
    the XLA variant, causal, with padding (forward: the kernels' gradients are tested above and
    in test_pallas.py, the gates are the same XLA code in both)."""
    b, n, h, d = 2, 29, 2, 16
    q, k, v, kv_mask = _inputs(10, b, n, h, d, kv_lens=(n, 21))
    mask = jnp.asarray(kv_mask)
    nsa = attention.get("nsa")
    hp = {"block_size": 8, "top_k": 2, "window": 3}
    st = nsa.init_state(jax.random.key(2), q_len=n, kv_len=n, num_heads=h, head_dim=d,
                        **hp)["params"]
    out, out_x = jax.jit(lambda q, k, v, st: [
        nsa(q, k, v, impl=impl, kv_mask=mask, causal=True, **hp, **st, **extra)
        for impl, extra in (("pallas", {"block_q": 8, "block_k": 8, "interpret": True}),
                            ("xla", {}))], compiler_options=FAST_COMPILE)(q, k, v, st)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_x), atol=TOL, rtol=TOL)


def test_pallas_paths_lower_through_triton():
    """Forward and backward of sliding_sink (learned sink) and moba lower for a GPU (nsa and
    mixture run these kernels and block_sparse's, whose lowering test_pallas.py checks)."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    b, t, h, d = 2, 200, 2, 64
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)

    def count(impl_fn, **arrays):
        def f(q, k, v, kv_mask):
            out, vjp = jax.vjp(lambda q, k, v: impl_fn(q, k, v, kv_mask), q, k, v)
            return out, vjp(out)
        lowered = jax.jit(f).trace(spec(b, t, h, d), spec(b, t, h, d), spec(b, t, h, d),
                                   mask).lower(lowering_platforms=("cuda",))
        return lowered.as_text().count("xla.gpu.triton")

    sink = jnp.zeros((h,), jnp.float32)
    assert count(lambda q, k, v, m: attention.get("sliding_sink")(
        q, k, v, impl="pallas", kv_mask=m, causal=True, window=20, num_sink=4,
        learned_sink=True, sink=sink, interpret=False)) == 3
    assert count(lambda q, k, v, m: attention.get("moba")(
        q, k, v, impl="pallas", kv_mask=m, causal=True, block_size=64, top_k=3,
        interpret=False)) == 3
