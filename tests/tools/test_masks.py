"""tools.masks: each mask picture is the pattern the variant really computes (its output equals
a dense softmax restricted to the drawn mask), and a layer's attention map reproduces what the
layer computed for dense and fixed-pattern variants (and is flagged for approximations)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from attention._util import masked_softmax
from configs.loader import load
from tools import masks
from training.loop import setup

N = 64


pytestmark = pytest.mark.usefixtures("fast_compile")


def test_every_fixed_pattern_variant_is_pictured():
    found = masks.pattern_variants()
    for name in attention.names():
        has_predicate = callable(getattr(attention.patterns, name, None))
        assert (name in found) == has_predicate, name


@pytest.mark.parametrize("name", masks.pattern_variants())
def test_picture_is_the_pattern_the_variant_computes(name):
    panels, state = masks.picture_setup(name, N)
    pictures = masks.variant_masks(name, N)
    assert len(pictures) == len(panels)
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, N, 1, 8))  # [B, T, H, D] each
    fn = attention.get(name).fn

    @jax.jit
    def reference(q, k, v, mask):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
        return jnp.einsum("bhqk,bkhd->bqhd", masked_softmax(logits, mask), v)

    for hp, (_, mask) in zip(panels, pictures):
        assert 0 < mask.mean() < 1, "the picture must show a sparse structure"
        out = jax.jit(lambda q, k, v, st: fn(q, k, v, kv_mask=None, causal=False, **hp,
                                             **st["params"], **st["buffers"]))(q, k, v, state)
        np.testing.assert_allclose(out, reference(q, k, v, jnp.asarray(mask)), atol=2e-5,
                                   err_msg=name)


def test_mask_pngs_are_written(tmp_path):
    names = masks.pattern_variants()[:1]
    if not names:
        pytest.skip("no fixed-pattern variant registered")
    paths = masks.draw_masks(str(tmp_path), length=16, variants=names)
    assert [os.path.basename(p) for p in paths] == [f"{n}.png" for n in names] + ["patterns.png"]
    import matplotlib.image as mpimg
    assert mpimg.imread(paths[0]).std() > 0.05


@functools.lru_cache(maxsize=None)
def _model(variant, window=None):
    attention_overrides = {} if window is None else {"window": window}
    config = load(f"configs/listops.py:{variant},tiny")
    for k, val in attention_overrides.items():
        config.attention[k] = val
    s = setup(config)
    model, _ = nnx.merge(s.graphdef, s.state)
    test = s.task.splits["test"]
    i = int(np.argmax([test[j]["mask"].sum() for j in range(16)]))  # a long example
    return model, test[i]


def test_attention_map_reproduces_a_dense_layer():
    model, ex = _model("dense")
    r = masks.attention_map(model, ex["inputs"], ex["mask"], layer=0, head=1)
    real = r["kv_mask"]
    w = r["weights"]
    assert r["pattern"] is None and r["prefix"] == 1  # CLS prepended by the model
    assert r["exact_error"] < 1e-5
    np.testing.assert_allclose(w[real].sum(-1), 1.0, rtol=1e-5)
    assert np.all(w[:, ~real] == 0)  # padding gets no weight


@pytest.mark.skipif("local" not in attention.VARIANTS, reason="needs the local variant")
def test_attention_map_of_a_pattern_variant_stays_in_its_pattern():
    model, ex = _model("local", window=2)
    r = masks.attention_map(model, ex["inputs"], ex["mask"], layer=0, head=0)
    t = r["weights"].shape[0]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    np.testing.assert_array_equal(r["pattern"], np.abs(i - j) <= 2)
    assert np.all(r["weights"][~r["pattern"]] == 0)
    assert r["exact_error"] < 1e-5  # the layer computed exactly this map


@pytest.mark.skipif("performer" not in attention.VARIANTS, reason="needs performer")
def test_attention_map_flags_an_approximating_variant():
    model, ex = _model("performer")
    r = masks.attention_map(model, ex["inputs"], ex["mask"], layer=0, head=0)
    assert r["pattern"] is None
    assert r["exact_error"] > 1e-3  # softmax(q k^T) is not what a kernel method computes


def test_bad_layer_or_head_is_a_value_error():
    model, ex = _model("dense")
    with pytest.raises(ValueError, match="layer must be in"):
        masks.attention_map(model, ex["inputs"], ex["mask"], layer=5)
    with pytest.raises(ValueError, match="head must be in"):
        masks.attention_map(model, ex["inputs"], ex["mask"], head=9)
