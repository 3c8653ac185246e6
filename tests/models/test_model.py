"""Model: shapes, parameter counts, padding invariance, variant state wiring."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from models import build_model, count_params
from models.encoder import sinusoidal_2d_positions, sinusoidal_positions

pytestmark = pytest.mark.usefixtures("fast_compile")  # small shapes: compile time dominates


def tiny(**model):
    c = listops_config.get_config("dense,tiny")
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    c.model.update(model)
    return c


def expected_params(m, vocab, classes, max_len, pair=False):
    """Independent count: embeddings + blocks + final norm + head (dense attention)."""
    e, q, h, layers = m.emb_dim, m.qkv_dim, m.mlp_dim, m.num_layers
    n = vocab * e
    if m.pooling == "cls":
        n += e
    if m.pos_embedding == "learned":
        n += (max_len + (m.pooling == "cls")) * e
    block = 2 * e + 3 * (e * q + q) + (q * e + e) + 2 * e + (e * h + h) + (h * e + e)
    n += layers * block + 2 * e
    head_in = e * (4 if pair else 1)
    return n + head_in * h + h + h * classes + classes


@pytest.mark.parametrize("pooling, pos, pair", [
    ("cls", "sinusoidal", False), ("mean", "learned", False), ("cls", "learned", True)])
def test_shapes_and_param_count(pooling, pos, pair):
    c = tiny(pooling=pooling, pos_embedding=pos, num_layers=2)
    model = build_model(c, num_classes=10, vocab_size=16, max_len=24, pair=pair)
    shape = (3, 2, 24) if pair else (3, 24)
    x = jnp.ones(shape, jnp.int32)
    logits = model(x, jnp.ones(shape, bool))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert count_params(model) == expected_params(c.model, 16, 10, 24, pair)


def test_sinusoidal_2d_positions_depend_on_2d_offset():
    """Dot products of the 2D table are a function of (row offset, column offset) alone."""
    rows, cols, dim = 6, 8, 16
    table = sinusoidal_2d_positions((rows, cols), dim, num_prefix=1)
    assert table.shape == (1 + rows * cols, dim)
    np.testing.assert_array_equal(table[0], 0.0)           # CLS: no position
    grid = table[1:].reshape(rows, cols, dim)
    # same offset (1, 2) from two different places
    a = grid[0, 0] @ grid[1, 2]
    b = grid[3, 4] @ grid[4, 6]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # the row half is constant along a row, the column half along a column
    np.testing.assert_array_equal(grid[2, :, : dim // 2], np.broadcast_to(grid[2, 0, : dim // 2],
                                                                          (cols, dim // 2)))
    np.testing.assert_array_equal(grid[:, 5, dim // 2:], np.broadcast_to(grid[0, 5, dim // 2:],
                                                                         (rows, dim // 2)))
    with pytest.raises(ValueError, match="divisible by 4"):
        sinusoidal_2d_positions((rows, cols), 6)


def test_sinusoidal_2d_in_model_needs_a_grid():
    c = tiny(pos_embedding="sinusoidal2d")
    model = build_model(c, num_classes=2, vocab_size=16, max_len=24, grid_shape=(4, 6))
    assert model(jnp.ones((2, 24), jnp.int32), jnp.ones((2, 24), bool)).shape == (2, 2)
    with pytest.raises(ValueError, match="image-like tasks"):
        build_model(c, num_classes=2, vocab_size=16, max_len=24)
    with pytest.raises(ValueError, match="image-like tasks"):
        build_model(c, num_classes=2, vocab_size=16, max_len=24, grid_shape=(4, 5))


# Parameter counts of the published LRA ListOps Transformer (dense): a regression table.
def test_listops_published_size():
    c = listops_config.get_config("dense")
    abstract = nnx.eval_shape(lambda: build_model(c, num_classes=10, vocab_size=16,
                                                  max_len=2000))
    assert count_params(abstract) == expected_params(c.model, 16, 10, 2000)
    assert count_params(abstract) == 8_956_426


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_invariance(pooling):
    c = tiny(pooling=pooling, num_layers=2)
    model = build_model(c, num_classes=10, vocab_size=16, max_len=20)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 16, (2, 20))
    mask = np.arange(20)[None] < np.array([[12], [20]])
    base = model(jnp.asarray(tokens), jnp.asarray(mask))
    tokens2 = np.where(mask, tokens, rng.integers(0, 16, (2, 20)))  # change padded tokens
    np.testing.assert_allclose(model(jnp.asarray(tokens2), jnp.asarray(mask)), base, atol=1e-5)
    # fewer pads: same real tokens, shorter input
    short = model(jnp.asarray(tokens[:1, :12]), jnp.asarray(mask[:1, :12]))
    np.testing.assert_allclose(short, base[:1], atol=1e-5)


def test_dropout_only_in_training():
    c = tiny()
    c.model.dropout_rate = 0.5
    model = build_model(c, num_classes=10, vocab_size=16, max_len=16)
    x, m = jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), bool)
    np.testing.assert_array_equal(model(x, m), model(x, m))
    a = model(x, m, train=True, rngs=nnx.Rngs(dropout=1))
    b = model(x, m, train=True, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)


def test_sinusoidal_table():
    t = sinusoidal_positions(50, 8)
    np.testing.assert_allclose(t[:, 0], np.sin(np.arange(50)), atol=1e-6)
    np.testing.assert_allclose(t[:, 1], np.cos(np.arange(50)), atol=1e-6)


def test_bad_model_fields():
    with pytest.raises(ValueError, match="model.pooling must be one of"):
        build_model(tiny(pooling="max"), num_classes=2, vocab_size=4, max_len=8)
    with pytest.raises(ValueError, match="qkv_dim .* divisible"):
        build_model(tiny(num_heads=3), num_classes=2, vocab_size=4, max_len=8)
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        build_model(tiny(dtype="float16"), num_classes=2, vocab_size=4, max_len=8)


def test_bfloat16_model_close_to_float32():
    c32 = tiny(num_layers=2)
    c16 = tiny(num_layers=2, dtype="bfloat16")
    m32 = build_model(c32, num_classes=10, vocab_size=16, max_len=16)
    m16 = build_model(c16, num_classes=10, vocab_size=16, max_len=16)
    x = jnp.asarray(np.random.default_rng(1).integers(1, 16, (2, 16)))
    m = jnp.ones((2, 16), bool)
    np.testing.assert_allclose(m16(x, m), m32(x, m), atol=0.1)
