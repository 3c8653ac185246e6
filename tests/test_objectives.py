"""Objectives: causal_lm's loss at a position never sees later tokens; denoise scores only the
masked positions and hides what is there; pair inputs; refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attention
from configs import listops as listops_config
from models import build_model
from training import objectives

T, V = 32, 20


@pytest.fixture(autouse=True)
def fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def _config(variant="dense", pooling="mean"):
    c = listops_config.get_config(f"{variant},tiny")
    c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
    c.model.pooling = pooling
    return c


def _model(variant="dense", causal=False, pooling="mean"):
    return build_model(_config(variant, pooling), num_classes=3, vocab_size=V, max_len=T,
                       head="tokens", causal=causal, seed=1)


def _batch(seed=0, b=3, shape=None):
    rng = np.random.default_rng(seed)
    shape = shape or (b, T)
    mask = np.ones(shape, bool)
    mask[-1, ..., T - 5:] = False                     # one padded row
    return {"inputs": rng.integers(0, V, shape).astype(np.int32), "mask": mask,
            "label": np.zeros(shape[0], np.int32)}


CAUSAL = [(n, p) for n, p in (("dense", "cls"), ("local", "mean"), ("performer", "mean"))
          if n in attention.names()]


@pytest.mark.parametrize("variant, pooling", CAUSAL)
def test_causal_logits_at_i_ignore_tokens_after_i(variant, pooling):
    model = _model(variant, causal=True, pooling=pooling)
    b = _batch()
    i = 13
    changed = b["inputs"].copy()
    changed[:, i + 1:] = (changed[:, i + 1:] + 7) % V
    a = model(jnp.asarray(b["inputs"]), jnp.asarray(b["mask"]))
    c = model(jnp.asarray(changed), jnp.asarray(b["mask"]))
    np.testing.assert_allclose(a[:, :i + 1], c[:, :i + 1], atol=1e-5)
    assert np.abs(np.asarray(a[:, i + 1:] - c[:, i + 1:])).max() > 1e-3  # later ones do see them


def test_causal_lm_scores_next_token_of_real_pairs():
    model = _model(causal=True)
    b = _batch()
    out = objectives.causal_lm(model, b, train=False)
    logits = model(jnp.asarray(b["inputs"]), jnp.asarray(b["mask"]))
    w = b["mask"][:, :-1] & b["mask"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b["inputs"][:, 1:])
    np.testing.assert_allclose(out["loss_sum"], (ce * w).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(out["count"], w.sum(1))
    assert out["count"][-1] == T - 6   # padded row: only pairs of real tokens


def test_denoise_scores_only_masked_positions_and_hides_them():
    model = _model()
    b = _batch(shape=(8, T))
    full = objectives.denoise(model, b, train=False, mask_rate=1.0)
    np.testing.assert_array_equal(full["count"], b["mask"].sum(1))   # real tokens only
    none = objectives.denoise(model, b, train=False, mask_rate=0.0)
    assert float(none["count"].sum()) == 0.0 and float(none["loss_sum"].sum()) == 0.0
    # With every token hidden the predictions cannot depend on the tokens themselves.
    other = dict(b, inputs=(b["inputs"] + 3) % V)
    everything = jnp.asarray(b["mask"])
    la = model(jnp.asarray(b["inputs"]), everything, replace=everything)
    lb = model(jnp.asarray(other["inputs"]), everything, replace=everything)
    np.testing.assert_allclose(la[b["mask"]], lb[b["mask"]], atol=1e-5)  # padded: anything
    # The loss is the cross-entropy at the chosen positions and nowhere else.
    key = objectives._eval_key(jnp.asarray(b["inputs"]))
    chosen = objectives.mask_positions(key, jnp.asarray(b["mask"]), 0.5)
    half = objectives.denoise(model, b, train=False, mask_rate=0.5)
    logits = model(jnp.asarray(b["inputs"]), jnp.asarray(b["mask"]), replace=chosen)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["inputs"])
    np.testing.assert_allclose(half["loss_sum"], (ce * chosen).sum(1), rtol=1e-5)
    share = float(half["count"].sum() / b["mask"].sum())
    assert 0.4 < share < 0.6, share


def test_denoise_training_masks_differ_per_step_and_pairs_count_both_sides():
    from flax import nnx
    model = _model()
    b = _batch(shape=(2, 2, T))
    a = objectives.denoise(model, b, train=True, rngs=nnx.Rngs(dropout=0))
    c = objectives.denoise(model, b, train=True, rngs=nnx.Rngs(dropout=1))
    assert a["count"].shape == (2,) and not np.array_equal(a["loss_sum"], c["loss_sum"])
    all_ = objectives.denoise(model, b, train=False, mask_rate=1.0)
    np.testing.assert_array_equal(all_["count"], b["mask"].reshape(2, -1).sum(1))


def test_refusals_name_what_is_wrong():
    non_causal = [n for n in attention.names() if not attention.get(n).supports_causal]
    assert non_causal
    with pytest.raises(ValueError, match=f"{non_causal[0]!r} does not support causal"):
        _model(non_causal[0], causal=True)
    with pytest.raises(ValueError, match="train.objective must be one of"):
        objectives.get("mlm")

    class LM:
        name, causal = "lm", True

    class Classification:
        name, causal = "listops", False

    with pytest.raises(ValueError, match="must be 'causal_lm'"):
        objectives.check_task("classify", LM, "dense")
    with pytest.raises(ValueError, match="must support causal attention"):
        objectives.check_task("causal_lm", Classification, non_causal[0])
    objectives.check_task("denoise", Classification, non_causal[0])  # bidirectional: fine
    assert objectives.model_spec("causal_lm") == {"head": "tokens", "causal": True}
