"""Objectives through the loop: lm trains and reports bits per byte; denoise pretraining ->
init_from loads the pretrained encoder exactly and a fresh head; mismatches are clear errors."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from configs import lm as lm_config
from training import loop
from training.loop import train_and_evaluate


@pytest.fixture(autouse=True)
def fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def _listops(tmp_path, variant="dense", **train):
    c = listops_config.get_config(f"{variant},tiny")
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.workers = 1
    c.train.update(dict(steps=4, eval_every=100, checkpoint_every=100, log_every=2), **train)
    return c


def test_lm_tiny_reports_bits_per_byte(tmp_path):
    c = lm_config.get_config("dense,tiny")
    c.train.update(steps=4, eval_every=100, checkpoint_every=100, log_every=2)
    c.data.eval_bytes = 2048
    res = train_and_evaluate(c, str(tmp_path / "lm"))
    assert res["objective"] == "causal_lm"
    assert res["test_bits_per_byte"] == pytest.approx(res["test_loss"] / math.log(2))
    assert 0 < res["test_bits_per_byte"] < 9
    saved = json.load(open(tmp_path / "lm" / "results.json"))
    files = saved["task_info"]["splits"]["test"]["files"]
    assert sum(n for _, n in files) == 2048 == saved["task_info"]["splits"]["test"]["bytes"]


def test_lm_refuses_classify_and_non_causal_variants(tmp_path):
    c = lm_config.get_config("dense,tiny")
    c.train.objective = "classify"
    with pytest.raises(ValueError, match="must be 'causal_lm'"):
        train_and_evaluate(c, str(tmp_path / "a"))
    c = lm_config.get_config("dense,tiny")
    c.attention.name = "linformer"
    with pytest.raises(ValueError, match="must support causal attention"):
        train_and_evaluate(c, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def _encoder(state):
    return nnx.to_pure_dict(state)[0]["encoder"]


def test_init_from_loads_pretrained_encoder_and_a_fresh_head(tmp_path):
    pre_dir = str(tmp_path / "pre")
    pre = _listops(tmp_path, objective="denoise", learning_rate=0.5)
    res = train_and_evaluate(pre, pre_dir)
    assert res["objective"] == "denoise"
    s_pre = loop.setup(pre)
    fresh_pre = jax.tree.map(np.asarray, _encoder(s_pre.state))
    assert loop.load_checkpoint(pre_dir, s_pre) == 4
    pretrained = _encoder(s_pre.state)

    ft = _listops(tmp_path, init_from=pre_dir)
    s_ft = loop.setup(ft)
    s_scratch = loop.setup(_listops(tmp_path))
    assert s_ft.init["init_objective"] == "denoise" and s_ft.init["init_step"] == 4
    moved = 0
    for a, b, f in zip(jax.tree.leaves(pretrained), jax.tree.leaves(_encoder(s_ft.state)),
                       jax.tree.leaves(fresh_pre)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        moved += not np.array_equal(np.asarray(a), f)
    assert moved > 0   # pretraining changed the encoder, and that is what was loaded
    head_ft = nnx.to_pure_dict(s_ft.state)[0]["head"]
    head_scratch = nnx.to_pure_dict(s_scratch.state)[0]["head"]
    for a, b in zip(jax.tree.leaves(head_ft), jax.tree.leaves(head_scratch)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # fresh, as from scratch
    res = train_and_evaluate(ft, str(tmp_path / "ft"))
    assert res["init_from"]["init_from"] == os.path.abspath(pre_dir)


def test_init_from_mismatch_names_what_differs(tmp_path):
    pre_dir = str(tmp_path / "pre")
    train_and_evaluate(_listops(tmp_path, objective="denoise"), pre_dir)
    other = _listops(tmp_path, "local", init_from=pre_dir)
    with pytest.raises(ValueError, match="attention variant: pretrained 'dense', this run 'local'"):
        loop.setup(other)
    wider = _listops(tmp_path, init_from=pre_dir)
    wider.model.emb_dim = 48
    with pytest.raises(ValueError, match="model.emb_dim: pretrained 32, this run 48"):
        loop.setup(wider)
    with pytest.raises(ValueError, match="no such directory"):
        loop.setup(_listops(tmp_path, init_from=str(tmp_path / "absent")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no config.json"):
        loop.setup(_listops(tmp_path, init_from=str(tmp_path / "empty")))
