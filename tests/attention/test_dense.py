"""The dense reference: equals a direct softmax formula and jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention

pytestmark = pytest.mark.usefixtures("fast_compile")  # small shapes: compile time dominates


def direct(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v in numpy float64, rows with no key -> 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.where(mask, np.exp(s - m), 0)
    w = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(kk, (2, 9, 3, 8)) for kk in ks]


@pytest.mark.parametrize("causal", [False, True])
def test_matches_formula_and_jax(qkv, causal):
    q, k, v = qkv
    lengths = np.array([9, 5])
    kv_mask = np.arange(9)[None] < lengths[:, None]
    out = attention.get("dense")(q, k, v, kv_mask=jnp.asarray(kv_mask), causal=causal)
    mask = kv_mask[:, None, None, :]
    if causal:
        mask = mask & np.tril(np.ones((9, 9), bool))
    np.testing.assert_allclose(out, direct(q, k, v, mask), atol=1e-5)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                       key_value_seq_lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_gradients_match_jax(qkv):
    q, k, v = qkv
    lengths = jnp.array([9, 6])
    mask = jnp.arange(9)[None] < lengths[:, None]
    ours = jax.grad(lambda *a: jnp.sum(attention.get("dense")(*a, kv_mask=mask) ** 2),
                    argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(
        *a, key_value_seq_lengths=lengths) ** 2), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_fully_masked_rows_are_zero(qkv):
    q, k, v = qkv
    mask = jnp.zeros((2, 9), bool).at[0, 3].set(True)
    out = attention.get("dense")(q, k, v, kv_mask=mask)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[0], jnp.broadcast_to(v[0, 3], (9, 3, 8)), atol=1e-6)


def test_bfloat16_close_to_float32(qkv):
    q, k, v = qkv
    out32 = attention.get("dense")(q, k, v)
    out16 = attention.get("dense")(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=5e-2)


def test_registry_errors():
    with pytest.raises(ValueError, match="Unrecognized attention variant: 'nope'.*dense"):
        attention.get("nope")
    with pytest.raises(ValueError, match="no hyperparameter"):
        attention.hparams_for("dense", {"window": 3})
    with pytest.raises(ValueError, match="impl must be one of"):
        attention.implementation("dense", "cuda")
    v = attention.get("dense")
    assert v.supports_causal and v.complexity == "O(n^2)"
    assert v.init_state(jax.random.key(0), q_len=4, kv_len=4, num_heads=1, head_dim=2) == \
        {"params": {}, "buffers": {}}


def test_shape_errors(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="dense: q, k, v must be"):
        attention.get("dense")(q[0], k, v)
    with pytest.raises(ValueError, match="kv_mask must be"):
        attention.get("dense")(q, k, v, kv_mask=jnp.ones((2, 4), bool))


def test_auto_impl_is_xla_on_cpu():
    import jax
    assert jax.default_backend() == "cpu"
    assert attention.implementation("dense", "auto") is attention.get("dense").fn
    assert attention.implementation("local", "auto") is attention.get("local").fn
