"""Exact and fixed-pattern variants against the dense reference.

Each variant equals softmax attention restricted to its pattern's mask, the mask built from
the same predicate (attention/patterns.dense_mask) that the variant uses on its blocks: at
random shapes with lengths that are not multiples of any block/chunk/tile size, with padding,
causal, float32 and bfloat16, forward and gradients (q, k, v). The reference and its gradients
are computed in numpy float64 (closed-form softmax backward), so only the variant compiles.
Invalid hyperparameters raise ValueError naming the variant and the field, before any compile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import patterns
from attention._banded import band_block
from tests.attention.cases import CASES
from tests.attention.compile_options import FAST_COMPILE

pytestmark = pytest.mark.usefixtures("fast_compile")  # small shapes: compile time dominates

B, H, D = 2, 2, 8
VARIANTS = ["blockwise", "local", "strided", "sparse", "sparse_fixed", "longformer", "bigbird",
            "axial", "local2d"]


def _not_multiple(rng, lo, hi, *sizes):
    """A length in [lo, hi] that is not a multiple of any of `sizes` (> 1)."""
    while True:
        n = int(rng.integers(lo, hi + 1))
        if all(s <= 1 or n % s for s in sizes):
            return n


def draw(name, seed, causal):
    """Random hyperparameters and lengths -> (hp, q_len, kv_len, max_len, mask_fn).

    mask_fn(state) -> bool [Tq, Tk] or [H, Tq, Tk]: the pattern (without padding).
    """
    rng = np.random.default_rng(seed)
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    grid = name in ("axial", "local2d")

    def lengths(*sizes):
        n = _not_multiple(rng, 17, 45, *sizes)
        m = n if causal or grid else _not_multiple(rng, n - 5, n + 5, *sizes)
        return n, m

    if name == "blockwise":
        hp = {"chunk_size": r(3, 9)}
        tq, tk = lengths(hp["chunk_size"])
        keep = lambda i, j: np.ones(np.broadcast_shapes(i.shape, j.shape), bool)  # noqa: E731
    elif name == "local":
        hp = {"window": r(0, 9)}
        tq, tk = lengths(band_block(hp["window"]))
        keep = lambda i, j: patterns.local(i, j, **hp)  # noqa: E731
    elif name == "strided":
        hp = {"stride": r(2, 7)}
        tq, tk = lengths(hp["stride"])
        keep = lambda i, j: patterns.strided(i, j, **hp)  # noqa: E731
    elif name == "sparse":
        hp = {"window": r(1, 4), "stride": r(3, 8)}
        tq, tk = lengths(hp["stride"], band_block(hp["window"]))
        keep = lambda i, j: patterns.sparse(i, j, **hp)  # noqa: E731
    elif name == "sparse_fixed":
        b = r(3, 8)
        hp = {"block_size": b, "summary": r(1, b - 1)}
        tq, tk = lengths(b)
        keep = lambda i, j: patterns.sparse_fixed(i, j, **hp)  # noqa: E731
    elif name == "longformer":
        hp = {"window": r(1, 5), "num_global": r(1, 3)}
        tq, tk = lengths(band_block(hp["window"]))
        keep = lambda i, j: patterns.longformer(i, j, **hp)  # noqa: E731
    elif name == "bigbird":
        hp = {"block_size": r(3, 6), "num_window_blocks": int(rng.choice([1, 3, 5])),
              "num_global_blocks": r(0, 3), "num_random_blocks": r(1, 3)}
        tq, tk = lengths(hp["block_size"])
    elif name == "axial":
        hp = {"shape": (r(2, 7), r(2, 7)), "axis": r(0, 1), "num_prefix": r(0, 2)}
        tq = tk = hp["num_prefix"] + hp["shape"][0] * hp["shape"][1]
        keep = lambda i, j: patterns.axial(i, j, **hp)  # noqa: E731
    elif name == "local2d":
        hp = {"shape": (r(3, 11), r(3, 11)), "window": r(1, 3), "num_prefix": r(0, 1)}
        tq = tk = hp["num_prefix"] + hp["shape"][0] * hp["shape"][1]
        keep = lambda i, j: patterns.local2d(i, j, **hp)  # noqa: E731
    max_len = tq if grid else max(tq, tk) + r(0, 9)  # init_state sees the model's max length

    def mask_fn(state):
        if name != "bigbird":
            return patterns.dense_mask(keep, tq, tk, causal=causal)
        bs = hp["block_size"]
        nb = -(-max(tq, tk) // bs)
        layout = np.asarray(state["buffers"]["random_layout"])[:, :nb]
        return np.stack([patterns.dense_mask(
            patterns.bigbird, tq, tk, causal=causal, block_size=bs, num_blocks=nb,
            num_window_blocks=hp["num_window_blocks"],
            num_global_blocks=hp["num_global_blocks"], random_layout=layout[h])
            for h in range(H)])
    return hp, tq, tk, max_len, mask_fn


def reference(q, k, v, mask, ct):
    """Masked softmax attention and its gradients w.r.t. q, k, v for the cotangent ct, float64.

    mask: bool [B|1, H|1, Tq, Tk]; rows with no visible key give zeros (and zero gradients).
    """
    q, k, v, ct = (np.asarray(x, np.float64) for x in (q, k, v, ct))
    scale = 1.0 / np.sqrt(q.shape[-1])
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(mask, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.where(den == 0, 1.0, den)  # [B, H, Tq, Tk]
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dv = np.einsum("bhqk,bqhd->bkhd", p, ct)
    dp = np.einsum("bqhd,bkhd->bhqk", ct, v)
    ds = p * (dp - np.einsum("bqhd,bqhd->bhq", ct, out)[..., None])
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    return out, (dq, dk, dv)


def run_case(name, seed, causal, dtype):
    hp, tq, tk, max_len, mask_fn = draw(name, seed, causal)
    variant = attention.get(name)
    state = variant.init_state(jax.random.key(seed), q_len=max_len, kv_len=max_len,
                               num_heads=H, head_dim=D, **hp)
    arrays = {**state["params"], **state["buffers"]}
    rng = np.random.default_rng(seed)  # numpy inputs: no eager jax ops to compile
    q = jnp.asarray(rng.standard_normal((B, tq, H, D), np.float32), dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, tk, H, D), np.float32), dtype) for _ in "kv")
    ct = rng.standard_normal((B, tq, H, D), np.float32)
    kv_mask = np.ones((B, tk), bool)
    kv_mask[1, tk - 4:] = False      # padding at the end
    kv_mask[0, 1] = False            # and a masked key inside
    kv_mask = jnp.asarray(kv_mask)

    def loss(q, k, v):
        out = variant.fn(q, k, v, kv_mask=kv_mask, causal=causal, **hp, **arrays)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, out), grads = jax.jit(grad, compiler_options=FAST_COMPILE)(q, k, v)
    assert out.dtype == dtype and out.shape == (B, tq, H, D)
    mask = np.asarray(mask_fn(state))
    mask = (mask[None, None] if mask.ndim == 2 else mask[None]) & np.asarray(kv_mask)[:, None,
                                                                                      None, :]
    ref_out, ref_grads = reference(*(np.asarray(x, np.float32) for x in (q, k, v)), mask, ct)
    return out, grads, ref_out, ref_grads, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_float32_equals_dense_reference(name, causal):
    seed = 100 * VARIANTS.index(name) + causal
    out, grads, ref_out, ref_grads, mask = run_case(name, seed, causal, jnp.float32)
    # The pattern is really sparse here (not dense in disguise), and rows with keys exist.
    assert 0.0 < mask.mean() < (0.75 if name != "blockwise" else 1.0)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for g, r, what in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4, err_msg=f"d{what}")


@pytest.mark.parametrize("name", VARIANTS)
def test_bfloat16_equals_dense_reference(name):
    seed = 100 * VARIANTS.index(name) + 7
    out, grads, ref_out, ref_grads, _ = run_case(name, seed, False, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=3e-2, rtol=3e-2)
    for g, r, what in zip(grads, ref_grads, "qkv"):
        assert g.dtype == jnp.bfloat16
        scale = max(1.0, np.abs(r).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=3e-2 * scale, rtol=5e-2,
                                   err_msg=f"d{what}")


def test_bigbird_random_layout():
    """Drawn from the key, sized by the model's max length, avoiding window and global blocks
    while enough others exist, each row's blocks distinct."""
    init = attention.get("bigbird").init_state
    hp = dict(block_size=4, num_window_blocks=3, num_global_blocks=2, num_random_blocks=3)
    a = init(jax.random.key(0), q_len=61, kv_len=61, num_heads=3, head_dim=8, **hp)
    b = init(jax.random.key(0), q_len=61, kv_len=61, num_heads=3, head_dim=8, **hp)
    c = init(jax.random.key(1), q_len=61, kv_len=61, num_heads=3, head_dim=8, **hp)
    assert a["params"] == {}
    layout = np.asarray(a["buffers"]["random_layout"])
    assert layout.shape == (3, 16, 3) and layout.dtype == np.int32
    np.testing.assert_array_equal(layout, b["buffers"]["random_layout"])
    assert (layout != np.asarray(c["buffers"]["random_layout"])).any()
    assert (layout != layout[:1]).any()  # heads differ
    qb = np.arange(16)[None, :, None]
    assert (np.abs(layout - qb) > 1).all()                       # outside the window
    assert ((layout > 0) & (layout < 15)).all()                  # not global (first, last)
    assert all(len(set(row)) == 3 for row in layout.reshape(-1, 3))


def test_bigbird_layout_must_cover_the_call():
    init, fn = attention.get("bigbird").init_state, attention.get("bigbird").fn
    hp = dict(block_size=4, num_window_blocks=3, num_global_blocks=2, num_random_blocks=2)
    state = init(jax.random.key(0), q_len=16, kv_len=16, num_heads=H, head_dim=D, **hp)
    x = jnp.zeros((1, 17, H, D))  # 5 blocks > the layout's 4
    with pytest.raises(ValueError, match="bigbird.*random_layout"):
        jax.eval_shape(lambda x: fn(x, x, x, **hp, **state["buffers"]), x)
    with pytest.raises(ValueError, match="bigbird.*random_layout"):
        jax.eval_shape(lambda x: fn(x, x, x, **hp), x[:, :16])


INVALID = [
    ("blockwise", {"chunk_size": 0}, "chunk_size"),
    ("local", {"window": -1}, "window"),
    ("local", {"window": 2.5}, "window"),
    ("strided", {"stride": 0}, "stride"),
    ("sparse", {"window": -1}, "window"),
    ("sparse", {"stride": 0}, "stride"),
    ("sparse_fixed", {"block_size": 0}, "block_size"),
    ("sparse_fixed", {"summary": -1}, "summary"),
    ("sparse_fixed", {"block_size": 4, "summary": 5}, "summary"),
    ("longformer", {"window": -2}, "window"),
    ("longformer", {"num_global": -1}, "num_global"),
    ("bigbird", {"block_size": 0}, "block_size"),
    ("bigbird", {"num_window_blocks": 0}, "num_window_blocks"),
    ("bigbird", {"num_global_blocks": -1}, "num_global_blocks"),
    ("bigbird", {"num_random_blocks": -1}, "num_random_blocks"),
    ("axial", {"axis": 2}, "axis"),
    ("axial", {"shape": (4, 5)}, "shape"),   # 1 + 20 != the length
    ("axial", {"shape": (0, 25)}, "shape"),
    ("axial", {"num_prefix": -1}, "num_prefix"),
    ("local2d", {"window": -1}, "window"),
    ("local2d", {"shape": (3, 3)}, "shape"),
    ("local2d", {"shape": "32x32"}, "shape"),
]


@pytest.mark.parametrize("name,bad,field", INVALID)
def test_invalid_hyperparameters_raise_before_compile(name, bad, field):
    hp = {**attention.hparams_for(name, CASES[name]), **bad}
    n = 25 if name == "axial" else 31 if name == "local2d" else 24
    x = jax.ShapeDtypeStruct((1, n, H, D), jnp.float32)
    variant = attention.get(name)      # the registry checks declared values, fn those of shapes
    with pytest.raises(ValueError, match=f"{name}.*{field}|{field}.*{name}"):
        jax.eval_shape(lambda x: variant(x, x, x, **hp), x)  # tracing only: nothing compiles
    if name == "bigbird":  # init_state checks the same fields
        with pytest.raises(ValueError, match=f"{name}.*{field}"):
            attention.get(name).init_state(jax.random.key(0), q_len=n, kv_len=n, num_heads=H,
                                           head_dim=D, **hp)
