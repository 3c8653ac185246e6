"""The shared training loop end to end on tiny ListOps: learning, exact resume, multi-device,
bad inputs (faults, NaN guard and damaged checkpoints: tests/test_faults.py)."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import listops as listops_config
from training.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compile")


def tiny_config(tmp_path, **train):
    c = listops_config.get_config("dense,tiny")
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.workers = 1
    c.train.update(train)
    return c


def rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def saved_params(workdir, step):
    """All arrays of a checkpoint (model and optimizer state)."""
    import orbax.checkpoint as ocp
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.tree.leaves(tree)


def test_loss_falls_and_outputs_written(tmp_path):
    c = tiny_config(tmp_path, steps=80, log_every=10, eval_every=40, checkpoint_every=40,
                    learning_rate=0.5, warmup_steps=10)
    c.data.num_train = 32  # small enough to fit: the loss must fall
    c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
    res = train_and_evaluate(c, str(tmp_path / "run"))
    losses = [r["loss"] for r in rows(tmp_path / "run")]
    assert np.mean(losses[-3:]) < 0.85 * losses[0], losses
    for key in ("steps_per_sec", "examples_per_sec", "learning_rate", "grad_norm"):
        assert key in rows(tmp_path / "run")[0]
    assert [r["step"] for r in rows(tmp_path / "run", "validation")] == [40, 80]
    with open(tmp_path / "run" / "results.json") as f:
        saved = json.load(f)
    assert saved["test_accuracy"] == res["test_accuracy"]
    assert saved["num_params"] > 0 and saved["config"]["attention"]["name"] == "dense"
    assert glob.glob(str(tmp_path / "run" / "tensorboard" / "events.*"))


def test_exact_resume(tmp_path):
    full = tiny_config(tmp_path, steps=12, checkpoint_every=6, eval_every=100)
    train_and_evaluate(full, str(tmp_path / "full"))
    part = tiny_config(tmp_path, steps=6, checkpoint_every=6, eval_every=100)
    train_and_evaluate(part, str(tmp_path / "resumed"))
    train_and_evaluate(full, str(tmp_path / "resumed"))  # same workdir: resumes at step 6
    a, b = saved_params(tmp_path / "full", 12), saved_params(tmp_path / "resumed", 12)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    steps = [r["step"] for r in rows(tmp_path / "resumed")]
    assert steps == sorted(steps) and steps[-1] == 12


def test_workdir_of_another_config_is_refused(tmp_path):
    c = tiny_config(tmp_path, steps=2, eval_every=100)
    train_and_evaluate(c, str(tmp_path / "w"))
    before = sorted(os.listdir(tmp_path / "w" / "checkpoints"))
    other = tiny_config(tmp_path, steps=2, eval_every=100)
    other.model.emb_dim = 16
    with pytest.raises(ValueError, match="holds a run of another config.*model.emb_dim"):
        train_and_evaluate(other, str(tmp_path / "w"))
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == before
    with open(tmp_path / "w" / "config.json") as f:
        assert json.load(f)["model"]["emb_dim"] == 32


def start_cli(*args, env=None):
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args, env=None):
    return finish(start_cli(*args, env=env))


def test_four_devices_match_one(tmp_path):
    """The same tiny run on 4 fake CPU devices (batch sharded) gives the 1-device losses, with
    dropout on (0.1): the Philox masks are a function of the position in the global batch, not
    of the device that holds it."""
    args = ["--config=configs/listops.py:dense,tiny", "--config.train.steps=6",
            "--config.train.log_every=1", "--config.train.eval_every=100",
            f"--config.data.cache_dir={tmp_path / 'cache'}"]
    devices = os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count="
    one = start_cli(*args, f"--workdir={tmp_path / 'one'}", env={"XLA_FLAGS": devices + "1"})
    four = start_cli(*args, f"--workdir={tmp_path / 'four'}", env={"XLA_FLAGS": devices + "4"})
    one, four = finish(one), finish(four)
    assert one.returncode == 0, one.stderr[-2000:]
    assert four.returncode == 0, four.stderr[-2000:]
    assert "devices 4 x cpu" in four.stdout + four.stderr
    l1 = [r["loss"] for r in rows(tmp_path / "one")]
    l4 = [r["loss"] for r in rows(tmp_path / "four")]
    assert len(l1) == 6
    np.testing.assert_allclose(l4, l1, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/listops.py:nosuchvariant"], "neither a flag .* nor an attention variant"),
    (["--config=configs/nosuchtask.py"], "nosuchtask.py"),
    (["--config=configs/listops.py:tiny", "--config.train.stepz=3"], "stepz"),
    (["--config=configs/listops.py:tiny", "--config.train.steps=abc"], "abc"),
])
def test_cli_bad_input(tmp_path, args, message):
    out = run_cli(*args, f"--workdir={tmp_path / 'w'}")
    assert out.returncode != 0
    assert __import__("re").search(message, out.stderr), out.stderr[-1500:]
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_unknown_task(tmp_path):
    c = tiny_config(tmp_path)
    c.data.task = "sudoku"
    with pytest.raises(ValueError, match="Unrecognized task: 'sudoku'. Valid tasks: .*listops"):
        train_and_evaluate(c, str(tmp_path / "w"))


def test_state_shapes_come_before_the_arrays(tmp_path):
    """initial_state reads shapes from nnx.eval_shape; the jitted init (accelerators) makes the
    same arrays in the requested sharding as the op-by-op init (CPU), up to the float rounding
    of the normal inits' scale folded into the sampler."""
    from jax.sharding import NamedSharding, PartitionSpec

    import lra
    from models import count_params
    from training.loop import initial_state, make_mesh, model_and_optimizer, setup
    c = tiny_config(tmp_path)
    task = lra.get_task(c.data)
    build = lambda: model_and_optimizer(c, task)  # noqa: E731
    replicated = NamedSharding(make_mesh(), PartitionSpec())
    _, abstract, eager = initial_state(build, replicated, jit=False)
    _, _, jitted = initial_state(build, replicated, jit=True)
    leaves = jax.tree_util.tree_leaves_with_path
    shapes = {jax.tree_util.keystr(p): (x.shape, x.dtype) for p, x in leaves(abstract)}
    assert shapes == {jax.tree_util.keystr(p): (x.shape, x.dtype) for p, x in leaves(eager)}
    assert setup(c).num_params == count_params(build()[0]) > 0
    for (path, a), (_, b) in zip(leaves(eager), leaves(jitted)):
        assert b.sharding.is_equivalent_to(replicated, b.ndim)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_the_first_step_reuses_the_checking_trace(tmp_path):
    """trace_train_step's abstract inputs carry the real inputs' shardings: the jitted step is
    traced once, not again at step 1."""
    import jax.numpy as jnp

    from training import objectives
    from training.loop import make_train_step, setup, trace_train_step
    c = tiny_config(tmp_path)
    s = setup(c)
    traces = []

    def counted(model, batch, **kw):
        traces.append(1)
        return objectives.classify(model, batch, **kw)

    s.train_step = jax.jit(make_train_step(s.graphdef, c.seed, counted), donate_argnums=0)
    trace_train_step(s, c.data.batch_size)
    assert len(traces) == 1
    examples = [s.task.splits["train"][i] for i in range(c.data.batch_size)]
    batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}
    state, _ = s.train_step(s.state, jax.device_put(batch, s.data_sharding),
                            jnp.asarray(0, jnp.int32))
    assert len(traces) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
