"""Registry-wide properties of every attention variant (a new variant is tested by existing).

For each name in attention.VARIANTS, with its hyperparameters from tests/attention/cases.py and
its params/buffers from init_state (called as the model layer calls it):
  - it has a CASES entry;
  - padding invariance: outputs at real positions do not change when the keys/values at padded
    positions change, nor when the number of pads changes;
  - causality (perturbing position t changes nothing before t), or ValueError for causal=True
    where the registry says the variant cannot be causal;
  - a query with no visible key gets zeros, never NaN; gradients are finite (also there);
  - jit- and vmap-safe (vmap over an extra leading axis equals the plain batch);
  - bfloat16 runs and stays close to float32;
  - dropout (where supported) is deterministic given the key and is really applied.
Where a property does not apply to a variant, the tables below say so and why.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from tests.attention.cases import CASES

NAMES = attention.names()
B, H, D = 4, 2, 8
N = 24             # length for variants without a grid
EXTRA_PADS = 8     # the "more pads" call is N + EXTRA_PADS long
PADS = 5           # row 1 and 2: the last PADS positions are padding

# Variants whose pattern depends on the padded length itself, so adding pads legitimately
# changes outputs at real positions. {name: reason}
PAD_COUNT_DEPENDENT = {
    "bigbird": "the last floor(g/2) global blocks are the last blocks of the padded sequence "
               "(Zaheer et al.), so adding pads moves them",
}

# Variants whose length is fixed by a hyperparameter (a grid): the number of pads cannot change
# without changing the grid. {name: reason}
FIXED_LENGTH = {name: "length = num_prefix + rows * cols is fixed by `shape`"
                for name in NAMES if "shape" in attention.get(name).defaults}


@pytest.fixture(autouse=True, scope="module")
def fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def length_of(hp) -> int:
    if "shape" in hp:
        return hp.get("num_prefix", 0) + hp["shape"][0] * hp["shape"][1]
    return N


def setup(name):
    """(hyperparameters, length, state arrays) as the model layer would build them."""
    hp = attention.hparams_for(name, CASES[name])
    n = length_of(hp)
    max_len = n if "shape" in hp else n + EXTRA_PADS
    state = attention.get(name).init_state(jax.random.key(7), q_len=max_len, kv_len=max_len,
                                           num_heads=H, head_dim=D, **hp)
    return hp, n, {**state["params"], **state["buffers"]}


def caller(name, hp, arrays, causal=False):
    """fn(q, k, v, mask, **extra) with the variant's hyperparameters and state arrays."""
    fn = attention.get(name).fn

    def call(q, k, v, mask, **extra):
        return fn(q, k, v, kv_mask=mask, causal=causal, **hp, **arrays, **extra)
    return call


def inputs(n, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (B, n, H, D), dtype) for kk in ks[:3])
    return q, k, v, ks[3]


def padded_batch(n, seed=0):
    """Rows: 0 all real; 1 the last PADS padded; 2 = row 1 with other k/v at the pads;
    3 no real position at all."""
    q, k, v, key = inputs(n, seed)
    real = np.arange(n) < n - PADS
    mask = np.stack([np.ones(n, bool), real, real, np.zeros(n, bool)])
    q, k, v = (x.at[2].set(x[1]) for x in (q, k, v))
    noise = 10.0 * jax.random.normal(key, (2, n, H, D))
    pad = jnp.asarray(~real)[:, None, None]
    k = k.at[2].set(jnp.where(pad, noise[0], k[1]))
    v = v.at[2].set(jnp.where(pad, noise[1], v[1]))
    return q, k, v, jnp.asarray(mask), real


def test_every_variant_has_a_case():
    assert set(attention.VARIANTS) - set(CASES) == set()


@pytest.mark.parametrize("name", NAMES)
def test_padding_no_key_and_gradients(name):
    hp, n, arrays = setup(name)
    q, k, v, mask, real = padded_batch(n)
    call = caller(name, hp, arrays)
    ct = jax.random.normal(jax.random.key(3), q.shape)

    def loss(q, k, v):
        out = call(q, k, v, mask)
        return jnp.sum(out * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    out = np.asarray(out)
    assert out.shape == q.shape and np.isfinite(out).all()
    # Pad values do not reach real positions.
    np.testing.assert_allclose(out[2, real], out[1, real], atol=2e-5, rtol=2e-5)
    # A query with no visible key gets zeros.
    np.testing.assert_array_equal(out[3], 0.0)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all(), f"{name}: non-finite gradient"
    # Padded keys/values get no gradient from any real output.
    for g in grads[1:]:
        np.testing.assert_allclose(np.asarray(g)[1, ~real], 0.0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_number_of_pads_does_not_matter(name):
    hp, n, arrays = setup(name)
    q, k, v, _ = inputs(n + EXTRA_PADS, seed=1)
    call = jax.jit(caller(name, hp, arrays))
    if name in FIXED_LENGTH:  # the property is "other lengths are refused", see the table
        with pytest.raises(ValueError, match="shape"):
            call(q, k, v, jnp.ones((B, n + EXTRA_PADS), bool))
        return
    real = n - PADS
    lengths = np.array([real, n, real, n])[:, None]
    mask = jnp.asarray(np.arange(n + EXTRA_PADS)[None] < lengths)  # [B, n + EXTRA_PADS]
    short = call(q[:, :n], k[:, :n], v[:, :n], mask[:, :n])
    long = call(q, k, v, mask)
    diff = np.abs(np.asarray(long)[:, :real] - np.asarray(short)[:, :real]).max()
    if name in PAD_COUNT_DEPENDENT:
        assert diff > 1e-4, f"{name} is listed as pad-count dependent but is invariant"
    else:
        assert diff < 2e-5, f"{name}: outputs at real positions change with the number of pads"


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
    hp, n, arrays = setup(name)
    q, k, v, key = inputs(n, seed=2)
    mask = jnp.ones((B, n), bool)
    if not attention.get(name).supports_causal:
        with pytest.raises(ValueError, match=name):
            caller(name, hp, arrays, causal=True)(q, k, v, mask)
        return
    t = n // 2
    # Row 1: every input at positions >= t changed. Row 3: key 0 masked, so query 0 sees nothing.
    later = jnp.asarray(np.arange(n) >= t)[:, None, None]
    noise = jax.random.normal(key, (3, n, H, D))
    q, k, v = (x.at[1].set(jnp.where(later, z, x[0])) for x, z in zip((q, k, v), noise))
    mask = mask.at[3, 0].set(False)
    out = np.asarray(jax.jit(caller(name, hp, arrays, causal=True))(q, k, v, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1, :t], out[0, :t], atol=2e-5, rtol=2e-5)
    assert np.abs(out[1, t:] - out[0, t:]).max() > 1e-3  # the perturbation is seen at >= t
    np.testing.assert_array_equal(out[3, 0], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_batch(name):
    hp, n, arrays = setup(name)
    q, k, v, mask, _ = padded_batch(n, seed=3)
    call = caller(name, hp, arrays)
    whole = jax.jit(call)(q, k, v, mask)
    split = lambda x: x.reshape(2, B // 2, *x.shape[1:])  # noqa: E731
    mapped = jax.jit(jax.vmap(lambda q, k, v, m: call(q, k, v, m)))(
        split(q), split(k), split(v), split(mask))
    np.testing.assert_allclose(np.asarray(mapped).reshape(whole.shape), whole,
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_close_to_float32(name):
    hp, n, arrays = setup(name)
    q, k, v, mask, real = padded_batch(n, seed=4)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    call = jax.jit(caller(name, hp, arrays))
    low = call(q, k, v, mask)
    high = call(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    assert low.dtype == jnp.bfloat16
    low, high = np.asarray(low, np.float32), np.asarray(high)
    assert np.isfinite(low).all()
    np.testing.assert_allclose(low[:2], high[:2], atol=0.05)


@pytest.mark.parametrize("name", [n for n in NAMES if attention.get(n).supports_dropout])
def test_dropout_is_keyed_and_applied(name):
    hp, n, arrays = setup(name)
    q, k, v, mask, _ = padded_batch(n, seed=5)
    call = caller(name, hp, arrays)
    run = jax.jit(lambda rng: call(q, k, v, mask, dropout_rate=0.5, dropout_rng=rng))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    plain = jax.jit(call)(q, k, v, mask)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(np.asarray(a)).all()
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-3
