"""Reformer's memory savings and rematerialisation (models/encoder.py): model.reversible,
model.remat, model.ffn_chunks. The switches are plain attributes of the built model, so each
test toggles them on one model (same parameters) instead of building another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models.encoder as encoder
import models.settings as settings
from configs import listops as listops_config
from models import build_model
from training.validate import ConfigError, validate_config

pytestmark = pytest.mark.usefixtures("fast_compile")

T = 20


def tiny(**model):
    c = listops_config.get_config("dense,tiny")
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    c.model.num_layers = 2
    c.model.update(model)
    return c


def _inputs():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 16, (2, T)))
    mask = jnp.asarray(np.arange(T)[None] < np.array([[T - 5], [T]]))
    return tokens, mask


def _grads(model, train=False):
    tokens, mask = _inputs()

    @nnx.jit
    def grads(model, tokens, mask):
        def loss(m):
            rngs = nnx.Rngs(dropout=7) if train else None
            return jnp.sum(jnp.sin(m(tokens, mask, train=train, rngs=rngs)))
        return nnx.grad(loss)(model)
    return grads(model, tokens, mask)


def _max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))


def _max_abs(a):
    return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a))


@pytest.fixture(scope="module")
def model():
    return build_model(tiny(dropout_rate=0.2, attention_dropout_rate=0.1), num_classes=10,
                       vocab_size=16, max_len=T)


def _set(model, *, remat=False, reversible=False, chunks=1, custom_vjp=True):
    enc = model.encoder
    enc.remat, enc.reversible, enc.custom_vjp = remat, reversible, custom_vjp
    for blk in enc.blocks:
        blk.ffn_chunks = chunks


def test_reversible_gradients_equal_autodiff_float64(monkeypatch):
    """The custom VJP (inputs rebuilt from outputs, layer by layer) against plain autodiff of
    the same reversible function in float64, with dropout: the recomputed masks must match."""
    monkeypatch.setitem(encoder.DTYPES, "float64", jnp.float64)
    monkeypatch.setitem(settings.CHOICES, "dtype", (*settings.CHOICES["dtype"], "float64"))
    with jax.enable_x64(True):
        c = tiny(reversible=True, dtype="float64", dropout_rate=0.2,
                 attention_dropout_rate=0.1)
        m = build_model(c, num_classes=10, vocab_size=16, max_len=T)
        params = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree.map(lambda p: p.astype(jnp.float64), params))
        got = _grads(m, train=True)
        m.encoder.custom_vjp = False
        want = _grads(m, train=True)
    scale, diff = _max_abs(want), _max_diff(got, want)
    assert scale > 1e-3
    # float64 but for the dense variant's attention dropout, which rounds through float32
    # (without dropout it stayed below 1e-10 of the scale; a wrong mask or a missing term
    # gives differences of the order of the gradients)
    assert diff < 1e-6 * scale, diff


def test_reversible_forward_is_the_two_stream_formula(model):
    """y1 = x1 + F(x2), y2 = x2 + G(y1) from x1 = x2 = embedded input; states = LN((y1+y2)/2)."""
    _set(model, reversible=True)
    tokens, mask = _inputs()
    enc = model.encoder
    got, _ = enc.states(tokens, mask)
    x = enc.embed(tokens)
    x = jnp.concatenate([jnp.broadcast_to(enc.cls[...], (2, 1, x.shape[-1])), x], axis=1)
    m = jnp.concatenate([jnp.ones((2, 1), bool), mask], axis=1)
    x1 = x2 = x + enc.pos[...][: x.shape[1]]
    for blk in enc.blocks:
        x1 = x1 + blk.attention_branch(x2, m, train=False, rngs=None)
        x2 = x2 + blk.ffn_branch(x1, train=False, rngs=None)
    np.testing.assert_allclose(got, enc.norm((x1 + x2) / 2), atol=1e-5)
    _set(model)
    std, _ = enc.states(tokens, mask)
    assert not np.allclose(std, got, atol=1e-3)    # not the standard residual stack


def test_remat_gives_identical_gradients(model):
    """In training with dropout: the remat'd blocks must draw the same keys."""
    for train in (True,):
        _set(model)
        want = _grads(model, train)
        _set(model, remat=True)
        got = _grads(model, train)
        assert _max_abs(want) > 1e-3
        assert _max_diff(got, want) < 1e-6, train
    _set(model)


def test_chunked_ffn_equals_unchunked(model):
    """4 chunks of a length of 21 (with CLS; padded to 24): outputs and gradients."""
    tokens, mask = _inputs()
    _set(model)
    want, want_g = model(tokens, mask), _grads(model)
    for chunks in (4,):
        _set(model, chunks=chunks)
        np.testing.assert_allclose(model(tokens, mask), want, atol=1e-5)
        assert _max_diff(_grads(model), want_g) < 1e-5, chunks
    # train mode: the chunked hidden is dropped (other keys, other outputs)
    blk = model.encoder.blocks[0]
    h = jax.random.normal(jax.random.key(0), (2, T, 32))
    a, b = (blk._chunked_mlp(h, train=True, rngs=nnx.Rngs(dropout=s)) for s in (1, 2))
    assert not np.allclose(a, b) and np.isfinite(a).all()
    _set(model)


def test_bad_combinations():
    for fields, match in [({"remat": True, "reversible": True}, "reversible"),
                          ({"ffn_chunks": 0}, "ffn_chunks")]:
        with pytest.raises(ConfigError, match=match):
            validate_config(tiny(**fields))
    with pytest.raises(ValueError, match="remat and model.reversible"):
        build_model(tiny(remat=True, reversible=True), num_classes=2, vocab_size=4, max_len=8)
    routing = listops_config.get_config("routing,tiny")
    routing.model.reversible = True
    with pytest.raises(ValueError, match="update_buffers"):
        build_model(routing, num_classes=2, vocab_size=16, max_len=64)


def _grad_temp_bytes(depth, **model):
    """Compiled (not run) temporary bytes of a training gradient of a tiny dense classifier."""
    import optax

    from tests.attention.compile_options import FAST_COMPILE
    from tools.compiled import compile_fn, memory

    c = tiny(num_layers=depth, emb_dim=16, qkv_dim=16, mlp_dim=32, num_heads=2, **model)
    length = 96
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: build_model(c, num_classes=10, vocab_size=16, max_len=length)))

    def grad(state, tokens, mask, labels):
        def loss(st):
            logits = nnx.merge(graphdef, st)(tokens, mask, train=True, rngs=nnx.Rngs(dropout=0))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return jax.grad(loss)(state)

    args = (state, jax.ShapeDtypeStruct((2, length), jnp.int32),
            jax.ShapeDtypeStruct((2, length), jnp.bool_), jax.ShapeDtypeStruct((2,), jnp.int32))
    # FAST_COMPILE: the growths below measured the same as with the default options
    return memory(compile_fn(grad, args, compiler_options=FAST_COMPILE)[0])["temp_bytes"]


def test_remat_memory_with_dropout_grows_far_slower_than_plain():
    """With dropout on, each remat'd layer must not leave behind what the plain layer keeps
    (masks, their random bits): compiled temp memory per added layer (1 -> 3 layers). With
    threefry masks (models/encoder.DROPOUT_PRNG = "threefry2x32") the CPU compile kept two
    uint32 arrays per dropout per layer and remat grew at 0.23x plain's rate; with
    models/dropout_prng's elementwise Philox at 0.02x."""
    drop = dict(dropout_rate=0.1, attention_dropout_rate=0.1)
    growth = {}
    for mode in ({}, {"remat": True}):
        a, b = (_grad_temp_bytes(d, **drop, **mode) for d in (1, 3))
        growth[bool(mode)] = (b - a) / 2
    assert growth[False] > 0
    assert growth[True] < 0.1 * growth[False], growth


def test_dropout_bits_are_philox2x32_10():
    """models/dropout_prng against Random123's known-answer vectors for Philox2x32-10
    (counter, key -> output), and its masks keep the requested fraction."""
    from models.dropout_prng import IMPL, philox2x32

    cases = [((0, 0), 0, (0xFF1DAE59, 0x6CD10DF2)),
             ((0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF, (0x2C3F628B, 0xAB4FD7AD)),
             ((0x243F6A88, 0x85A308D3), 0x13198A2E, (0xDD7CE038, 0xF62A4C12))]
    c0, c1, key = (np.array(col, np.uint32) for col in zip(*[(c[0][0], c[0][1], c[1])
                                                             for c in cases]))
    got = jax.jit(philox2x32)(c0, c1, key)
    np.testing.assert_array_equal(np.stack(got, 1), np.array([c[2] for c in cases], np.uint32))
    key = jax.random.wrap_key_data(jnp.array([1, 2], jnp.uint32), impl=IMPL)
    keep = jax.random.bernoulli(key, 0.9, (200, 500))
    assert abs(float(keep.mean()) - 0.9) < 0.005
