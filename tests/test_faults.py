"""Faults a run must survive or refuse cleanly (docs/faults.md lists them with their behaviour):
bad values refused before the workdir is touched, a non-finite update never saved, damaged
checkpoints skipped with a fall-back to the newest good one, a kill during a save, the run's
identity kept in the checkpoint, continuing a stopped run with a lower learning rate."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import listops as listops_config
from training import metrics as metrics_lib
from training.checkpoint import CheckpointError
from training.loop import ConfigError, NonFiniteError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(cache, **train):
    c = listops_config.get_config("dense,tiny")
    c.data.cache_dir = cache
    c.data.workers = 1
    c.train.update(dict(eval_every=100, log_every=1, checkpoint_every=2, keep_checkpoints=3))
    c.train.update(train)
    return c


def arrays(workdir, step):
    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                           "state"))
    return jax.tree.leaves(tree)


def train_rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6): what every resumed run must equal."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train_and_evaluate(tiny(cache, steps=6), workdir)
    return workdir


def assert_same_state(workdir, reference, step=6):
    a, b = arrays(workdir, step), arrays(reference, step)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# --- bad values: refused before anything is written ------------------------------------------

@pytest.mark.parametrize("group, field, value, match", [
    ("train", "steps", 0, r"train.steps=0 \(valid: an integer >= 1\)"),
    ("train", "steps", -5, r"train.steps=-5"),
    ("train", "log_every", 0, r"train.log_every=0"),
    ("train", "checkpoint_every", 0, r"train.checkpoint_every=0"),
    ("train", "eval_every", 0, r"train.eval_every=0"),
    ("data", "batch_size", 0, r"data.batch_size=0"),
    ("data", "eval_batch_size", 0, r"data.eval_batch_size=0"),
    ("model", "dropout_rate", 1.5, r"model.dropout_rate=1.5 \(valid: a finite number in \[0.0, "
                                   r"1.0\)\)"),
    ("train", "learning_rate", -0.05, r"train.learning_rate=-0.05 \(valid: a finite number in "
                                      r"\(0.0, inf\)\)"),
    ("train", "learning_rate", float("inf"), r"train.learning_rate=inf"),
    ("train", "b1", 1.0, r"train.b1=1.0"),
    ("train", "eps", 0.0, r"train.eps=0.0"),
    ("train", "warmup_steps", -1, r"train.warmup_steps=-1"),
    ("train", "keep_checkpoints", 0, r"train.keep_checkpoints=0"),
    ("model", "num_heads", 3, r"model.qkv_dim=32 must be divisible by model.num_heads=3"),
])
def test_bad_value_is_refused_before_the_workdir(tmp_path, cache, group, field, value, match):
    c = tiny(cache)
    c[group][field] = value
    with pytest.raises(ConfigError, match=match):
        train_and_evaluate(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_failed_start_does_not_lock_the_workdir(tmp_path, cache):
    """A value only the variant can check (traced before the workdir is opened): refused with
    nothing written, and the corrected command then runs in the same workdir."""
    bad = listops_config.get_config("local,tiny")
    bad.data.cache_dir, bad.data.workers = cache, 1
    bad.train.update(steps=1, eval_every=100)
    bad.attention.window = -1
    with pytest.raises(ValueError, match="window"):
        train_and_evaluate(bad, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    bad.attention.window = 4
    assert train_and_evaluate(bad, str(tmp_path / "w"))["steps"] == 1


def test_cli_bad_value_exits_nonzero_with_message(tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", "--config=configs/listops.py:tiny",
         "--config.train.steps=0", f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1
    assert "ConfigError: invalid config: train.steps=0 (valid: an integer >= 1)" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


# --- non-finite steps ----------------------------------------------------------------------

def test_infinite_learning_rate_never_saves_a_non_finite_array(tmp_path, cache, monkeypatch):
    """With validation bypassed, lr=inf gives a finite loss and gradient but a non-finite update:
    the step changes nothing, the run stops naming it, nothing non-finite is written."""
    import training.loop as loop
    monkeypatch.setattr(loop, "validate_config", lambda config: None)
    c = tiny(cache, steps=3, checkpoint_every=1, log_every=100, learning_rate=float("inf"),
             warmup_steps=0, schedule="constant")
    workdir = tmp_path / "w"
    with pytest.raises(NonFiniteError, match=r"non-finite update .* at step 1 .*there is no "
                                             r"checkpoint yet.*change_on_resume=True"):
        train_and_evaluate(c, str(workdir))
    assert glob.glob(str(workdir / "checkpoints" / "*")) == []
    assert not (workdir / "results.json").exists()
    for row in map(json.loads, open(workdir / "metrics.jsonl")):
        assert row["split"] != "train"  # the non-finite step was never logged as trained


def test_results_and_metrics_are_strict_json(tmp_path):
    path = str(tmp_path / "r.json")
    metrics_lib.write_json(path, {"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": 2}})
    strict = json.loads(open(path).read(), parse_constant=lambda t: pytest.fail(t))
    assert strict == {"a": None, "b": [None, 1.0], "c": {"d": 2}}


# --- damaged checkpoints ---------------------------------------------------------------------

def _largest_chunk(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def flip_bytes(step_dir):
    path = _largest_chunk(step_dir)
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    open(path, "wb").write(bytes(data))


def truncate_chunk(step_dir):
    path = _largest_chunk(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def remove_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def empty_meta(step_dir):
    open(os.path.join(step_dir, "meta", "metadata"), "w").close()


@pytest.fixture(scope="module")
def four_steps(cache, tmp_path_factory):
    """A run stopped at step 4 (checkpoints 2 and 4), copied by each damage test."""
    workdir = str(tmp_path_factory.mktemp("four"))
    train_and_evaluate(tiny(cache, steps=4), workdir)
    return workdir


@pytest.mark.parametrize("damage", [flip_bytes, truncate_chunk, remove_state, empty_meta])
def test_damaged_latest_checkpoint_falls_back(tmp_path, cache, four_steps, reference, damage,
                                              capsys):
    workdir = str(tmp_path / "w")
    shutil.copytree(four_steps, workdir)
    damage(os.path.join(workdir, "checkpoints", "4"))
    train_and_evaluate(tiny(cache, steps=6), workdir)
    out = capsys.readouterr().out
    assert "checkpoints/4 is damaged" in out and "resuming from step 2" in out
    assert glob.glob(os.path.join(workdir, "checkpoints_damaged", "4-*", "meta"))  # kept
    assert_same_state(workdir, reference)
    assert [r["step"] for r in train_rows(workdir)] == [1, 2, 3, 4, 5, 6]


def test_no_good_checkpoint_is_a_clear_error(tmp_path, cache, four_steps):
    workdir = str(tmp_path / "w")
    shutil.copytree(four_steps, workdir)
    flip_bytes(os.path.join(workdir, "checkpoints", "4"))
    empty_meta(os.path.join(workdir, "checkpoints", "2"))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    # Flipped bytes of a compressed chunk fail either its decoding or its checksum.
    with pytest.raises(CheckpointError, match=r"no good checkpoint .*checkpoints/4: (checksum "
                                              r"mismatch|its state is unreadable).*"
                                              r"checkpoints/2: its meta.*new --workdir"):
        train_and_evaluate(tiny(cache, steps=6), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


KILLER = """
import os, runpy, sys
from orbax.checkpoint._src.path import atomicity
real = atomicity.async_path.rename
async def rename(src, dst):  # the process dies after writing step KILL_AT, before committing it
    if os.path.basename(str(dst)) == os.environ["KILL_AT"]:
        os._exit(137)
    return await real(src, dst)
atomicity.async_path.rename = rename
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_during_a_save_then_exact_resume(tmp_path, cache, reference):
    workdir = tmp_path / "w"
    args = ["--config=configs/listops.py:dense,tiny", f"--workdir={workdir}",
            "--config.train.steps=6", "--config.train.eval_every=100",
            "--config.train.log_every=1", "--config.train.checkpoint_every=2",
            "--config.train.keep_checkpoints=3", "--config.data.workers=1",
            f"--config.data.cache_dir={cache}"]
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "KILL_AT": "4"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert glob.glob(str(workdir / "checkpoints" / "4.orbax-checkpoint-tmp*"))
    resumed = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT,
                             env={**env, "KILL_AT": "none"}, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 2" in resumed.stdout
    assert not glob.glob(str(workdir / "checkpoints" / "*tmp*"))
    assert_same_state(str(workdir), reference)
    assert [r["step"] for r in train_rows(workdir)] == [1, 2, 3, 4, 5, 6]  # each step once


# --- run identity and continuing a stopped run ------------------------------------------------

def test_identity_lives_in_the_checkpoint(tmp_path, cache, four_steps):
    workdir = str(tmp_path / "w")
    shutil.copytree(four_steps, workdir)
    os.remove(os.path.join(workdir, "config.json"))
    other = listops_config.get_config("local,tiny")
    other.data.cache_dir, other.data.workers = cache, 1
    other.train.update(dict(eval_every=100, log_every=1, checkpoint_every=2, keep_checkpoints=3))
    with pytest.raises(ConfigError, match=r"holds a run of another config .*attention.name: "
                                          r"'dense' -> 'local'"):
        train_and_evaluate(other, workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_continue_with_a_lower_learning_rate(tmp_path, cache, four_steps):
    workdir = str(tmp_path / "w")
    shutil.copytree(four_steps, workdir)
    lower = tiny(cache, steps=5, learning_rate=0.01)
    with pytest.raises(ConfigError, match=r"other training settings \(train.learning_rate: 0.05 "
                                          r"-> 0.01\).*change_on_resume=True"):
        train_and_evaluate(lower, workdir)
    lower.train.change_on_resume = True
    train_and_evaluate(lower, workdir)
    rows = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))]
    change = [r for r in rows if r["split"] == "resume"]
    assert change and change[0]["step"] == 4
    assert change[0]["changes"] == {"train.learning_rate": {"from": 0.05, "to": 0.01}}
    assert train_rows(workdir)[-1]["learning_rate"] < 0.01  # the new schedule is in force
    lower.train.change_on_resume = False  # the checkpoint now holds the new rate
    lower.train.steps = 6
    assert train_and_evaluate(lower, workdir)["steps"] == 6
