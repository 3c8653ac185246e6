"""Registry-wide properties of every attention variant (a new variant is tested by existing).

For each name in attention.VARIANTS, with its hyperparameters from tests/attention/cases.py and
its params/buffers from init_state (called as the model layer calls it):
  padding      outputs at real positions do not change when the keys/values at padded
               positions change; padded keys/values get no gradient;
  pad count    ... nor when the number of pads changes (a longer padded sequence);
  no key       a query with no visible key gets zeros, never NaN; gradients are finite;
  causal       perturbing the inputs at positions >= t changes nothing before t (and does
               change position t); or ValueError for causal=True where the registry says the
               variant cannot be causal;
  vmap         vmap over an extra leading axis equals the plain batch (everything is jitted);
  bfloat16     runs in bfloat16 and stays close to float32;
  dropout      (where supported) is really applied, independently per batch row.
Where a property does not apply to a variant, the tables below say so and why.

To keep compile time small, each variant compiles two programs (forward+backward on a batch
whose rows carry the padding cases; every other forward in one program) with fast-compile XLA
options, and the properties are checked on their outputs; all failing properties are reported
together.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from tests.attention.cases import CASES
from tests.attention.compile_options import FAST_COMPILE

pytestmark = pytest.mark.usefixtures("fast_compile")  # small shapes: compile time dominates

NAMES = attention.names()
B, H, D = 4, 2, 8
N = 24             # length for variants without a grid
EXTRA_PADS = 8     # the pad-count call is N + EXTRA_PADS long
PADS = 5           # rows 1, 2: the last PADS positions are padding
TOL = 2e-5

# Variants whose pattern depends on the padded length itself, so adding pads legitimately
# changes outputs at real positions. {name: reason}
PAD_COUNT_DEPENDENT = {
    "bigbird": "the last floor(g/2) global blocks are the last blocks of the padded sequence "
               "(Zaheer et al.), so adding pads moves them",
}

# Variants whose length is fixed by a hyperparameter (a grid): the number of pads cannot change
# without changing the grid; for them the property checked is that other lengths are refused.
FIXED_LENGTH = {name: "length = num_prefix + rows * cols is fixed by `shape`"
                for name in NAMES if "shape" in attention.get(name).defaults}


def setup(name):
    """(hyperparameters, length, state arrays) as the model layer builds them."""
    hp = attention.hparams_for(name, CASES[name])
    n = hp.get("num_prefix", 0) + hp["shape"][0] * hp["shape"][1] if "shape" in hp else N
    max_len = n if name in FIXED_LENGTH else n + EXTRA_PADS
    state = attention.get(name).init_state(jax.random.key(7), q_len=max_len, kv_len=max_len,
                                           num_heads=H, head_dim=D, **hp)
    return hp, n, {**state["params"], **state["buffers"]}


def caller(name, hp, arrays):
    fn = attention.get(name).fn

    def call(q, k, v, mask, causal=False, **extra):
        return fn(q, k, v, kv_mask=mask, causal=causal, **hp, **arrays, **extra)
    return call


def make_inputs(n):
    """q, k, v [B, n + EXTRA_PADS, H, D] and the inputs of the cases (numpy: no eager jax ops
    to compile)."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q, k, v = (normal(B, n + EXTRA_PADS, H, D) for _ in range(3))
    real = np.arange(n) < n - PADS
    # Rows: 0 all real; 1 the last PADS padded; 2 = row 1 with other k/v at the pads;
    # 3 no real position at all.
    mask = np.stack([np.ones(n, bool), real, real, np.zeros(n, bool)])
    pad = np.concatenate([~real, np.ones(EXTRA_PADS, bool)])
    for x in (q, k, v):
        x[2] = x[1]
    k[2, pad] = 10.0 * normal(pad.sum(), H, D)
    v[2, pad] = 10.0 * normal(pad.sum(), H, D)
    # Causal rows: 0 base, 1 = row 0 with every input at positions >= n // 2 changed,
    # 2 = row 0, 3 = row 0 with key 0 masked (query 0 then sees nothing).
    causal_qkv = []
    for x in (q, k, v):
        c = np.repeat(x[:1, :n], B, axis=0)
        c[1, n // 2:] = normal(n - n // 2, H, D)
        causal_qkv.append(c)
    causal_mask = np.ones((B, n), bool)
    causal_mask[3, 0] = False
    ct = normal(B, n, H, D)
    return (q, k, v), mask, real, causal_qkv, causal_mask, ct


@functools.lru_cache(maxsize=None)
def results(name):
    """Runs the variant's two programs once; -> dict of numpy outputs."""
    hp, n, arrays = setup(name)
    call = caller(name, hp, arrays)
    (q, k, v), mask, real, causal_qkv, causal_mask, ct = make_inputs(n)
    variant = attention.get(name)
    short = [x[:, :n] for x in (q, k, v)]

    def loss(q, k, v):
        out = call(q, k, v, jnp.asarray(mask))
        return jnp.sum(out * ct), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, out), grads = jax.jit(grad, compiler_options=FAST_COMPILE)(*short)

    def forwards(q, k, v, short, causal_qkv):
        res = {}
        split = lambda x: x.reshape(2, B // 2, *x.shape[1:])  # noqa: E731
        res["vmap"] = jax.vmap(call)(*(split(x) for x in short),
                                     split(jnp.asarray(mask))).reshape(out.shape)
        res["bf16"] = call(*(x.astype(jnp.bfloat16) for x in short), jnp.asarray(mask))
        if name not in FIXED_LENGTH:
            lengths = np.array([n, n - PADS, n - PADS, 0])[:, None]
            long_mask = np.arange(n + EXTRA_PADS)[None] < lengths
            res["long"] = call(q, k, v, jnp.asarray(long_mask))
        if variant.supports_causal:
            res["causal"] = call(*causal_qkv, jnp.asarray(causal_mask), causal=True)
        if variant.supports_dropout:
            res["dropout"] = call(*short, jnp.asarray(mask), dropout_rate=0.5,
                                  dropout_rng=jax.random.key(0))
        return res

    res = jax.jit(forwards, compiler_options=FAST_COMPILE)(q, k, v, short, causal_qkv)
    dtypes = {key: val.dtype for key, val in res.items()}
    res = {key: np.asarray(val.astype(jnp.float32)) for key, val in res.items()}
    res.update(out=np.asarray(out), grads=[np.asarray(g) for g in grads], n=n, real=real,
               dtypes=dtypes)
    return res


def _run_checks(name, checks):
    failed = []
    for what, check in checks:
        try:
            check()
        except AssertionError as e:
            failed.append(f"[{what}] {str(e).strip()[:600]}")
    assert not failed, f"{name}:\n" + "\n".join(failed)


def test_every_variant_has_a_case():
    assert set(attention.VARIANTS) - set(CASES) == set()


# Keywords of the contract (and of the Pallas kernels' tiles) that are no hyperparameters; their
# defaults are the contract's. State arrays default to None (init_state gives them).
CONTRACT = {"kv_mask": None, "causal": False, "dropout_rate": 0.0, "dropout_rng": None}


def _out_of_range(hp):
    """Values that an Int / Float / Choice declaration must refuse."""
    if isinstance(hp, attention.Int):
        return [hp.min - 1, hp.min + 0.5] + ([hp.max + 1] if hp.max is not None else [])
    if isinstance(hp, attention.Float):
        return [x for x in (hp.lo - 1, hp.hi + 1) if math.isfinite(x)] + ["many"]
    if isinstance(hp, attention.Choice):
        return ["not an option"]
    return []


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_are_declared_once(name):
    """Every hyperparameter is an Hp of the registry record; the XLA and Pallas functions,
    init_state and update_buffers take it without a default (no second copy to drift), and the
    registry refuses values out of its range, naming variant and field (no compile)."""
    variant = attention.get(name)
    functions = {"fn": variant.fn, "init_state": variant.make_state,
                 "pallas": attention.PALLAS.get(name), "update_buffers": variant.update_buffers}
    for what, fn in functions.items():
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        for p in params.values():
            if p.name in variant.hparams:
                assert p.default is p.empty, f"{name}: {what} gives {p.name} a default"
            elif p.kind == p.KEYWORD_ONLY and what in ("fn", "pallas"):
                assert p.default is not p.empty, f"{name}: {what} needs undeclared {p.name}"
                assert CONTRACT.get(p.name, None) == p.default, \
                    f"{name}: {what}'s keyword {p.name}={p.default!r} is not declared as an Hp"
    assert set(variant.hparams) <= set(inspect.signature(variant.fn).parameters)
    for key, hp in variant.hparams.items():
        assert isinstance(hp, attention.Hp) and type(hp) is not attention.Hp, \
            f"{name}: {key} is declared as {hp!r}, not Int/Float/Flag/Choice/Shape/Text"
        for bad in _out_of_range(hp):
            with pytest.raises(ValueError, match=f"{name}: {key} must be"):
                attention.hparams_for(name, {key: bad})


@pytest.mark.parametrize("name", NAMES)
def test_registry_properties(name):
    r = results(name)
    out, real, n = r["out"], r["real"], r["n"]
    variant = attention.get(name)

    def padding():
        assert out.shape == (B, n, H, D)
        np.testing.assert_allclose(out[2, real], out[1, real], atol=TOL, rtol=TOL)
        for g in r["grads"][1:]:  # padded keys/values get no gradient
            np.testing.assert_allclose(g[1, ~real], 0.0, atol=1e-6)

    def no_key():
        assert np.isfinite(out).all(), "non-finite output"
        np.testing.assert_array_equal(out[3], 0.0)
        for g, what in zip(r["grads"], "qkv"):
            assert np.isfinite(g).all(), f"non-finite gradient d{what}"

    def pad_count():
        if name in FIXED_LENGTH:  # see the table: other lengths must be refused
            hp, n_, arrays = setup(name)
            x = jax.ShapeDtypeStruct((1, n_ + EXTRA_PADS, H, D), jnp.float32)
            with pytest.raises(ValueError, match="shape"):
                jax.eval_shape(lambda x: caller(name, hp, arrays)(x, x, x, None), x)
            return
        long = r["long"][:, :n]  # rows 0, 1, 2: the same real tokens, EXTRA_PADS more pads
        diff = max(np.abs(long[0] - out[0]).max(),
                   np.abs(long[1:3, real] - out[1:3, real]).max())
        if name in PAD_COUNT_DEPENDENT:
            assert diff > 1e-4, "listed as pad-count dependent but invariant"
        else:
            assert diff < TOL, f"outputs at real positions change with the number of pads " \
                               f"(max diff {diff:.3g})"

    def causal():
        if not variant.supports_causal:
            hp, _, arrays = setup(name)
            x = jax.ShapeDtypeStruct((1, n, H, D), jnp.float32)
            with pytest.raises(ValueError, match=name):
                jax.eval_shape(lambda x: caller(name, hp, arrays)(x, x, x, None, causal=True),
                               x)
            return
        c, t = r["causal"], n // 2
        assert np.isfinite(c).all(), "non-finite causal output"
        np.testing.assert_allclose(c[1, :t], c[0, :t], atol=TOL, rtol=TOL)
        assert np.abs(c[1, t:] - c[0, t:]).max() > 1e-3, "perturbation at >= t not seen"
        np.testing.assert_array_equal(c[3, 0], 0.0)

    def vmap():
        np.testing.assert_allclose(r["vmap"], out, atol=TOL, rtol=TOL)

    def bfloat16():
        assert r["dtypes"]["bf16"] == jnp.bfloat16, f"output dtype {r['dtypes']['bf16']}"
        assert np.isfinite(r["bf16"]).all()
        np.testing.assert_allclose(r["bf16"][:3], out[:3], atol=0.05)

    def dropout():
        if not variant.supports_dropout:
            return
        a = r["dropout"]
        assert np.isfinite(a).all()
        assert np.abs(a - out).max() > 1e-3, "dropout_rate=0.5 changes nothing"
        # Rows 1 and 2 hold the same real tokens: independent dropout masks per row.
        assert np.abs(a[1, real] - a[2, real]).max() > 1e-3, "same dropout mask in every row"

    _run_checks(name, [("padding", padding), ("no visible key", no_key),
                       ("pad count", pad_count), ("causal", causal), ("vmap", vmap),
                       ("bfloat16", bfloat16), ("dropout", dropout)])
