"""Pallas kernels (interpret mode on the CPU) against the XLA variants of the same patterns.

Block masks against the dense mask of patterns.py; block-sparse flash attention and chunked
linear attention: outputs and dQ/dK/dV against the XLA implementation at lengths that are not
multiples of the tiles, with padding and causality; tiles the mask skips are never read; the
kernels lower through the GPU Triton lowering (cross-platform lowering, no GPU needed).
Tolerances follow JAX's own Pallas attention tests (float16 there: atol 0.05).
"""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import patterns
from attention.pallas import block_mask as bm
from attention.pallas import block_sparse

pytestmark = pytest.mark.filterwarnings("ignore:.*interpret mode:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Interpret-mode kernels are compile-bound here: skip XLA's optimisation passes."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


FIXED = ("dense", "local", "strided", "sparse", "sparse_fixed", "longformer", "bigbird")
KERNEL_ONLY = {"block_q", "block_k", "block_t", "interpret"}


def _inputs(seed, batch, length, heads, dim, dtype=jnp.float32, kv_lens=None):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, ct = (jax.random.normal(kk, (batch, length, heads, dim), dtype) for kk in keys)
    kv_mask = None
    if kv_lens is not None:
        kv_mask = jnp.arange(length)[None, :] < jnp.asarray(kv_lens)[:, None]
    return q, k, v, ct, kv_mask


def _both(name, hp, causal, kernel_kw, state=None):
    """jit: outputs and VJPs (dq, dk, dv, d state) of impl='pallas' and impl='xla'."""
    variant = attention.get(name)

    def run(q, k, v, ct, kv_mask, state):
        res = []
        for impl, extra in (("pallas", kernel_kw), ("xla", {})):
            fn = lambda q, k, v, st: variant(q, k, v, impl=impl, kv_mask=kv_mask,  # noqa: E731
                                             causal=causal, **hp, **st, **extra)
            out, vjp = jax.vjp(fn, q, k, v, state)
            res.append((out, vjp(ct.astype(out.dtype))))
        return res

    return lambda q, k, v, ct, kv_mask: jax.jit(run)(q, k, v, ct, kv_mask, state or {})


def _state(name, hp, length, heads, dim):
    st = attention.get(name).init_state(jax.random.key(7), q_len=length, kv_len=length,
                                        num_heads=heads, head_dim=dim, **hp)
    return {**st["params"], **st["buffers"]}


def _close(a, b, atol, rtol, what):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=what)


# ------------------------------------------------------------------------------ block masks

RULES = [
    (bm.Rule.make(None), 45, 45),
    (bm.Rule.make(None, causal=True), 70, 70),
    (bm.Rule.make("local", window=5), 53, 53),
    (bm.Rule.make("local", causal=True, window=9), 70, 70),
    (bm.Rule.make("strided", stride=13), 61, 61),
    (bm.Rule.make("sparse", causal=True, window=3, stride=20), 77, 77),
    (bm.Rule.make("sparse_fixed", block_size=12, summary=3), 50, 50),
    (bm.Rule.make("longformer", causal=True, window=4, num_global=3), 66, 66),
    (bm.Rule.make("local", window=6), 30, 47),  # q_len != kv_len
]


def _dense_rule_mask(rule, q_len, kv_len):
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    keep = rule.keep(i, j)
    return np.broadcast_to(True if keep is None else keep, (q_len, kv_len))


def _expected_states(keep, bq, bk):
    """listed iff any kept pair in the tile; full iff every pair (padded keys: not kept)."""
    q_len, kv_len = keep.shape
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    listed, full = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
    for a in range(nq):
        for c in range(nk):
            tile = keep[a * bq:(a + 1) * bq, c * bk:(c + 1) * bk]
            listed[a, c] = tile.any()
            full[a, c] = tile.all() and tile.shape[1] == bk
    return listed, full


def _check_lists(lists, listed, full):
    """lists [R, 2 + K] against states [R, C]: counts, full first, every listed block once."""
    for r in range(listed.shape[0]):
        n_full, n = int(lists[r, 0]), int(lists[r, 1])
        ids = list(np.asarray(lists[r, bm.HEADER:bm.HEADER + n]))
        assert n_full == full[r].sum() and n == listed[r].sum(), (r, n_full, n)
        assert ids[:n_full] == list(np.flatnonzero(full[r]))
        assert ids[n_full:] == list(np.flatnonzero(listed[r] & ~full[r]))


@pytest.mark.parametrize("rule,q_len,kv_len", RULES)
def test_block_lists_match_dense_mask(rule, q_len, kv_len):
    for bq, bk in ((8, 16), (16, 8)):
        keep = _dense_rule_mask(rule, q_len, kv_len)
        if rule.pattern:
            ref = patterns.dense_mask(getattr(patterns, rule.pattern), q_len, kv_len,
                                      causal=rule.causal, **dict(rule.hparams))
            np.testing.assert_array_equal(keep, ref)
        listed, full = _expected_states(keep, bq, bk)
        got_listed, got_full = bm.block_states(rule, q_len, kv_len, bq, bk)
        np.testing.assert_array_equal(got_listed, listed)
        np.testing.assert_array_equal(got_full, full)
        kv_lists, q_lists = bm.static_lists(rule, q_len, kv_len, bq, bk)
        _check_lists(kv_lists, listed, full)
        _check_lists(q_lists, listed.T, full.T)
        assert not (listed.all() and rule.pattern not in (None, "strided")), "degenerate case"


def test_bigbird_tiles_match_dense_mask_per_head():
    hp = {"block_size": 16, "num_window_blocks": 3, "num_global_blocks": 1,
          "num_random_blocks": 2}
    length, heads = 150, 3
    layout = _state("bigbird", hp, 180, heads, 8)["random_layout"]  # [H, 12, 2]
    num_blocks = -(-length // 16)
    for causal, (bq, bk) in ((False, (16, 8)), (True, (8, 16))):
        listed, full = bm.bigbird_states(
            length, length, bq, bk, block_size=16, num_window_blocks=3, num_global_blocks=1,
            random_layout=layout, causal=causal)
        for h in range(heads):
            keep = patterns.dense_mask(
                patterns.bigbird, length, length, causal=causal, block_size=16,
                num_blocks=num_blocks, num_window_blocks=3, num_global_blocks=1,
                random_layout=np.asarray(layout[h, :num_blocks]))
            exp_listed, exp_full = _expected_states(keep, bq, bk)
            np.testing.assert_array_equal(np.asarray(listed[h]), exp_listed)
            np.testing.assert_array_equal(np.asarray(full[h]), exp_full)
            assert not exp_listed.all()
    with pytest.raises(ValueError, match="block_size"):
        bm.bigbird_states(length, length, 32, 16, block_size=16, num_window_blocks=3,
                          num_global_blocks=1, random_layout=layout)


def test_block_lists_with_padding_are_per_example():
    rule = bm.Rule.make("longformer", window=4, num_global=2)
    q_len = kv_len = 45
    kv_lens = np.array([45, 23, 0])
    kv_mask = jnp.arange(kv_len)[None, :] < jnp.asarray(kv_lens)[:, None]
    mask = bm.from_rule(rule, q_len, kv_len, 8, 8, kv_mask)
    assert mask.kv_lists.shape[:2] == (3, 1)
    for b, n in enumerate(kv_lens):
        keep = _dense_rule_mask(rule, q_len, kv_len) & (np.arange(kv_len)[None, :] < n)
        listed, full = _expected_states(keep, 8, 8)
        _check_lists(np.asarray(mask.kv_lists[b, 0]), listed, full)
        _check_lists(np.asarray(mask.q_lists[b, 0]), listed.T, full.T)


# ------------------------------------------------------------------- block-sparse attention

# (hyperparameters, causal, length, head_dim, kv lengths of the batch, tiles): lengths are not
# multiples of the tiles; one example is padded, and dense has one with no real key at all.
# dense runs in bfloat16 (the kernels' dots take bf16, accumulate in f32), the others float32.
PATTERN_CASES = {
    "dense": ({}, True, 45, 64, (45, 29, 0), (16, 16)),
    "local": ({"window": 7}, True, 77, 64, (77, 50), (16, 16)),
    "strided": ({"stride": 19}, False, 61, 48, (61, 40), (16, 16)),
    "sparse": ({"window": 3, "stride": 23}, True, 70, 32, (70, 33), (16, 16)),
    "sparse_fixed": ({"block_size": 12, "summary": 3}, False, 58, 128, (58, 31), (16, 16)),
    "longformer": ({"window": 5, "num_global": 3}, True, 66, 32, (66, 41), (16, 8)),
    "bigbird": ({"block_size": 8, "num_window_blocks": 3, "num_global_blocks": 2,
                 "num_random_blocks": 2}, False, 75, 32, (75, 37), (8, 4)),
}


@pytest.mark.parametrize("name", sorted(PATTERN_CASES))
def test_block_sparse_matches_xla(name):
    hp, causal, length, dim, kv_lens, (bq, bk) = PATTERN_CASES[name]
    dtype = jnp.bfloat16 if name == "dense" else jnp.float32
    q, k, v, ct, kv_mask = _inputs(sorted(PATTERN_CASES).index(name), len(kv_lens), length, 2,
                                   dim, dtype, kv_lens=kv_lens)
    # bigbird: the random layout (sized for a longer maximum length) is a traced argument
    state = _state(name, hp, length + 9, 2, dim) if name == "bigbird" else None
    (out, grads), (out_x, grads_x) = _both(name, hp, causal, {"block_q": bq, "block_k": bk},
                                           state)(q, k, v, ct, kv_mask)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads[:3])
    tol = (2e-2, 5e-2) if dtype == jnp.bfloat16 else (2e-5, 5e-5)  # (out, grads)
    _close(out, out_x, tol[0], tol[0], f"{name} out")
    for g, gx, w in zip(grads[:3], grads_x[:3], "qkv"):
        _close(g, gx, tol[1], tol[1], f"{name} d{w}")
    if name == "dense":  # an example with no real key: zeros, not NaN
        np.testing.assert_array_equal(np.asarray(out[2], np.float32), 0.0)


def test_skipped_tiles_are_never_read():
    """Keys and values in tiles the block mask leaves out (here: whole padded tiles) may hold
    NaN without changing anything; the XLA reference sees the same inputs with zeros there."""
    length = 64
    q, k, v, _, _ = _inputs(5, 2, length, 2, 32)
    kv_mask = jnp.arange(length)[None, :] < jnp.array([64, 20])[:, None]
    # example 1: key tiles 2 and 3 (positions 32..63) are all padding
    poison = ((jnp.arange(length) >= 32)[None, :, None, None]
              & (jnp.arange(2) == 1)[:, None, None, None])
    kn, vn = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    local = attention.get("local")
    out = jax.jit(lambda q, k, v: local(q, k, v, impl="pallas", kv_mask=kv_mask, window=20,
                                        block_q=16, block_k=16))(q, kn, vn)
    ref = jax.jit(lambda q, k, v: local(q, k, v, kv_mask=kv_mask, window=20))(q, k, v)
    _close(out, ref, 2e-5, 2e-5, "padded tiles")


# ------------------------------------------------------------------------ linear attention


# Kernel paths: plain causal (linear), log key features against rescaled chunk states (favor+,
# causal) and against one max (exp, non-causal: the plain non-causal kernels; its projection
# is a param and gets a gradient).
LINEAR_CASES = [
    ("linear", {}, True, 58),
    ("performer", {"num_features": 24, "feature_map": "favor+"}, True, 61),
    ("performer", {"num_features": 24, "feature_map": "exp"}, False, 50),
]


@pytest.mark.parametrize("name,hp,causal,length", LINEAR_CASES)
def test_linear_matches_xla(name, hp, causal, length):
    dim = 16
    q, k, v, ct, kv_mask = _inputs(length, 2, length, 2, dim, kv_lens=(length, length - 17))
    if name == "performer":
        # keys of very different norms along the sequence: the per-chunk rescaling matters
        k = k * (1.0 + 2.0 * (jnp.arange(length) % 23 == 5))[None, :, None, None]
    state = _state(name, hp, length, 2, dim)
    (out, grads), (out_x, grads_x) = _both(name, hp, causal, {"block_t": 16}, state)(
        q, k, v, ct, kv_mask)
    _close(out, out_x, 2e-5, 1e-4, f"{name} out")
    for g, gx, w in zip(grads[:3], grads_x[:3], "qkv"):
        _close(g, gx, 1e-4, 1e-4, f"{name} d{w}")
    if hp.get("feature_map") == "exp":  # the learned projection gets the same gradient
        (gw,), (gwx,) = grads[3].values(), grads_x[3].values()
        assert float(jnp.abs(gwx).max()) > 0
        _close(gw, gwx, 1e-4, 1e-4, "d projection")


@pytest.mark.parametrize("causal", [False, True])
def test_performer_large_inputs_match_xla(causal):
    """q, k * 30 (the regime where unstabilised denominators underflow): the kernel's outputs
    and gradients are finite and equal the XLA variant's, no real row is all zero, and
    (causal) later keys do not move earlier outputs."""
    hp, length, dim = {"num_features": 32, "feature_map": "favor+"}, 40, 16
    q, k, v, ct, kv_mask = _inputs(11, 2, length, 2, dim, kv_lens=(length, 23))
    q, k = q * 30, k * 30
    state = _state("performer", hp, length, 2, dim)
    both = _both("performer", hp, causal, {"block_t": 16}, state)
    (out, grads), (out_x, grads_x) = both(q, k, v, ct, kv_mask)
    _close(out, out_x, 1e-4, 1e-3, "performer * 30 out")
    real = np.asarray(kv_mask)
    assert not np.any(np.all(np.asarray(out) == 0, axis=-1)[real]), "zero rows"
    for g, gx, w in zip(grads[:3], grads_x[:3], "qkv"):
        scale = float(jnp.abs(gx).max())
        _close(g, gx, 1e-4 * scale, 1e-3, f"performer * 30 d{w}")
    if causal:
        k2 = k.at[:, 9:].multiply(3.0)
        (out2, _), _ = both(q, k2, v, ct, kv_mask)
        np.testing.assert_allclose(np.asarray(out2)[:, :9], np.asarray(out)[:, :9], atol=1e-6,
                                   rtol=1e-6)


def test_performer_relu_features_forward():
    hp, length = {"num_features": 40, "feature_map": "relu"}, 37
    q, k, v, _, kv_mask = _inputs(3, 2, length, 2, 16, kv_lens=(length, 20))
    state = _state("performer", hp, length, 2, 16)
    run = jax.jit(lambda q, k, v, st, impl: attention.get("performer")(
        q, k, v, impl=impl, kv_mask=kv_mask, **hp, **st,
        **({"block_t": 16} if impl == "pallas" else {})), static_argnums=4)
    _close(run(q, k, v, state, "pallas"), run(q, k, v, state, "xla"), 2e-5, 1e-4, "relu out")


# -------------------------------------------------------------------- registry and lowering


def test_every_pattern_has_a_kernel_with_the_xla_signature():
    expected = set(FIXED) | {"linear", "performer"}
    registered = {n for n in expected if n in attention.VARIANTS}
    assert registered <= set(attention.PALLAS)
    for name in attention.PALLAS:
        xla = inspect.signature(attention.get(name).fn).parameters
        pallas = inspect.signature(attention.PALLAS[name]).parameters
        assert set(pallas) - set(xla) <= KERNEL_ONLY, name
        for p in xla.values():
            assert p.name in pallas, (name, p.name)
            assert pallas[p.name].default == p.default, (name, p.name)
            assert pallas[p.name].kind == p.kind, (name, p.name)


def test_bad_kernel_arguments_raise():
    q, k, v, _, _ = _inputs(0, 1, 20, 2, 16)
    with pytest.raises(ValueError, match="local.*block_q.*power of two"):
        attention.get("local")(q, k, v, impl="pallas", window=3, block_q=24)
    with pytest.raises(ValueError, match="local.*window"):
        attention.get("local")(q, k, v, impl="pallas", window=-1)
    with pytest.raises(ValueError, match="GPU"):
        block_sparse.pick_block(8, 100, "local", "block_q", interpret=False)


def test_dropout_runs_the_xla_variant():
    q, k, v, _, kv_mask = _inputs(1, 2, 30, 2, 16, kv_lens=(30, 12))
    kw = dict(kv_mask=kv_mask, window=4, dropout_rng=jax.random.key(2))
    local = attention.get("local")
    run = jax.jit(lambda q, k, v, rate, impl: local(q, k, v, impl=impl, dropout_rate=rate, **kw),
                  static_argnums=(3, 4))
    with pytest.warns(UserWarning, match="no attention dropout"):
        block_sparse._WARNED_DROPOUT.clear()
        out = run(q, k, v, 0.3, "pallas")
    ref = run(q, k, v, 0.3, "xla")
    no_drop = run(q, k, v, 0.0, "xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert float(jnp.abs(out - no_drop).max()) > 1e-3


def _triton_calls(fn, *shapes):
    lowered = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    return lowered.as_text().count("xla.gpu.triton")


def test_kernels_lower_through_triton():
    """Forward and backward lower for a GPU (Triton) from this CPU: power-of-two tiles, only
    primitives the Triton lowering has, list reads inside the kernel (no scalar prefetch)."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    b, t, h, d = 2, 200, 2, 96

    def fwd_bwd(impl_fn):
        def f(q, k, v, kv_mask):
            out, vjp = jax.vjp(lambda q, k, v: impl_fn(q, k, v, kv_mask), q, k, v)
            return out, vjp(out)
        return f

    sparse = fwd_bwd(lambda q, k, v, m: attention.get("sparse")(
        q, k, v, impl="pallas", kv_mask=m, causal=True, window=9, stride=40, interpret=False))
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
    assert _triton_calls(sparse, spec(b, t, h, d), spec(b, t, h, d), spec(b, t, h, d), mask) == 3
    st = _state("performer", {"num_features": 64}, t, h, d)
    perf = fwd_bwd(lambda q, k, v, m: attention.get("performer")(
        q, k, v, impl="pallas", kv_mask=m, causal=True, num_features=64, interpret=False, **st))
    # forward: states + output; backward: states, dQ, reverse states, dK/dV
    assert _triton_calls(perf, spec(b, t, h, d), spec(b, t, h, d), spec(b, t, h, d), mask) == 6


def test_interpret_default_on_cpu_warns_once():
    block_sparse._WARNED.clear()
    with pytest.warns(UserWarning, match="interpret mode"):
        assert block_sparse.resolve_interpret(None, "dense") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert block_sparse.resolve_interpret(None, "dense") is True
    assert block_sparse.resolve_interpret(False, "dense") is False
