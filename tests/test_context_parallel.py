"""Runs tests/multidevice/ in a process with 4 host CPU devices (the device count is fixed when
JAX starts, so it cannot change inside this one)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_context_parallel_on_four_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/multidevice"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_follow_one_device(tmp_path):
    """train.distributed over 2 processes x 2 host devices, a (data 2, seq 2) mesh across them:
    the losses of a one-device run, and one writer of metrics.jsonl."""
    import json

    import jax
    import numpy as np

    from configs import listops
    from training.loop import train_and_evaluate

    settings = ["--config.train.steps=3", "--config.train.log_every=1",
                "--config.train.eval_every=100", "--config.data.workers=1",
                "--config.model.dropout_rate=0", "--config.model.attention_dropout_rate=0",
                f"--config.data.cache_dir={tmp_path / 'cache'}"]
    c = listops.get_config("dense,tiny")
    c.train.update(steps=3, log_every=1, eval_every=100)
    c.data.update(workers=1, cache_dir=str(tmp_path / "cache"))
    c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        train_and_evaluate(c, str(tmp_path / "one"))
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/listops.py:dense,tiny",
         f"--workdir={tmp_path / 'two'}", "--config.train.distributed=True",
         f"--config.train.coordinator_address=localhost:{port}",
         "--config.train.num_processes=2", f"--config.train.process_id={i}",
         "--config.train.seq_shards=2", *settings], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "devices 4 x cpu" in outs[0]

    def losses(run):
        with open(tmp_path / run / "metrics.jsonl") as f:
            return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    assert len(losses("two")) == 3  # process 0 alone writes
    np.testing.assert_allclose(losses("two"), losses("one"), rtol=2e-4)
