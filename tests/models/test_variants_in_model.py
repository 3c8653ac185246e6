"""Every registered attention variant inside the model (registry-wide, so new variants are
covered): padding invariance of the logits, gradients reach the variant's params and never its
buffers, buffer updates happen in training mode only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from configs import listops as listops_config
from models import build_model
from models.multihead import AttentionBuffer
from tests.attention.cases import CASES

LEN, GRID = 16, (4, 4)


@pytest.fixture(autouse=True, scope="module")
def fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def make(name, pooling="mean"):
    c = listops_config.get_config("dense,tiny")
    c.model.update(num_layers=1, num_heads=2, emb_dim=16, qkv_dim=16, mlp_dim=16,
                   dropout_rate=0.0, attention_dropout_rate=0.0, pooling=pooling)
    c.attention = {"name": name, "impl": "xla", **CASES[name]}
    return build_model(c, num_classes=3, vocab_size=8, max_len=LEN, grid_shape=GRID, seed=1)


@nnx.jit
def forward(model, x, m):
    return model(x, m)


@pytest.mark.parametrize("name", attention.names())
def test_padding_invariance_in_model(name):
    model = make(name)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, (2, LEN))
    m = np.arange(LEN)[None] < np.array([[11], [LEN]])
    base = forward(model, jnp.asarray(x), jnp.asarray(m))
    x2 = np.where(m, x, rng.integers(0, 8, (2, LEN)))
    again = forward(model, jnp.asarray(x2), jnp.asarray(m))
    assert np.isfinite(np.asarray(base)).all()
    np.testing.assert_allclose(again, base, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", attention.names())
def test_gradients_reach_variant_params_not_buffers(name):
    model = make(name, pooling="cls")
    layer = model.encoder.blocks[0].attention
    x = jnp.asarray(np.random.default_rng(1).integers(0, 8, (2, LEN)))
    m = jnp.ones((2, LEN), bool)

    def loss(model):
        return jnp.sum(model(x, m) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(model)
    grad_layer = grads.encoder.blocks[0].attention
    for n in layer.param_names:
        g = np.asarray(getattr(grad_layer, f"param_{n}")[...])
        assert np.abs(g).sum() > 0, f"{name}: no gradient reaches param {n}"
    buffer_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, AttentionBuffer))}
    grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
    assert not buffer_paths & grad_paths


@pytest.mark.parametrize("name", [n for n in attention.names()
                                  if attention.get(n).update_buffers is not None])
def test_buffer_updates_only_in_training(name):
    model = make(name)
    layer = model.encoder.blocks[0].attention
    before = {n: np.asarray(getattr(layer, f"buffer_{n}")[...]) for n in layer.buffer_names}
    x = jnp.asarray(np.random.default_rng(2).integers(0, 8, (2, LEN)))
    m = jnp.ones((2, LEN), bool)
    nnx.jit(lambda model: model(x, m, train=False))(model)
    for n in layer.buffer_names:
        np.testing.assert_array_equal(getattr(layer, f"buffer_{n}")[...], before[n])
    nnx.jit(lambda model: model(x, m, train=True, rngs=nnx.Rngs(dropout=0)))(model)
    assert any(not np.allclose(getattr(layer, f"buffer_{n}")[...], before[n])
               for n in layer.buffer_names)


def test_layer_resolves_its_implementation_once():
    """The layer decides impl at construction ("auto": pallas on a GPU where a kernel exists)
    and keeps the function; an unknown impl fails there, not at the first call."""
    from models.multihead import MultiHeadAttention

    def layer(impl):
        return MultiHeadAttention(emb_dim=8, qkv_dim=8, num_heads=2, attention_name="local",
                                  hparams=attention.hparams_for("local"), impl=impl, max_len=8,
                                  dropout_rate=0.0, rngs=nnx.Rngs(0))

    auto = "pallas" if jax.default_backend() == "gpu" else "xla"
    for impl, expected in (("auto", auto), ("xla", "xla")):
        built = layer(impl)
        assert built.impl == expected
        assert built.attention_fn is attention.implementation("local", expected)
    with pytest.raises(ValueError, match="impl"):
        layer("cuda")
