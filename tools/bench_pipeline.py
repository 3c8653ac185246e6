"""Input-pipeline cost: a training step fed by the real pipeline vs the same step on a
preloaded batch, and the host time to build one batch.

    python -m tools.bench_pipeline --configs configs/listops.py:dense,tiny configs/listops.py:dense,small
        [--steps 50] [--rounds 3] [--out results/pipeline_cpu]
    python -m tools.bench_pipeline --all_tiny --mock     # every task's tiny config

Rounds alternate the two modes; the table gives the median step time of each, the pipeline's
cost (fed - preloaded) / preloaded (two noisy timings on a shared machine), and build_pct: the
median serial time to build one batch / the preloaded step time, i.e. the cost if the
prefetch threads overlapped nothing (an upper bound that does not depend on the overlap).
*_first columns use a freshly built copy of the split: step_ms_pipeline_first is one round of
fed steps through its first epoch (generated Pathfinder images are made by the prefetch threads
then, memoized afterwards), build_ms_first the serial build of unseen batches; build_ms times
batches already seen.

--mock: text and image read `tfds.testing.mock_data` records (random bytes / pixels of the
real shapes) and retrieval reads synthetic rows written in the release's TSV format, so the
benchmark runs without the downloads; the table's data column says which data each row used.
ListOps and Pathfinder are generated, as in training.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.loader import load
import lra
from lra import pipeline
from training.loop import setup

ALL_TINY = ["configs/listops.py:dense,tiny", "configs/text.py:dense,tiny",
            "configs/retrieval.py:dense,tiny", "configs/image.py:dense,tiny",
            "configs/pathfinder.py:dense,tiny", "configs/pathx.py:dense,tiny"]


def write_synthetic_aan(folder: str, max_len: int, seed: int = 0, per_split: int = 512) -> None:
    """Synthetic rows in the release format (label, id1, id2, text1, text2): random printable
    documents of max_len bytes, so the byte pipeline does its real amount of work."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ,.;()0123456789", np.uint8)
    os.makedirs(folder, exist_ok=True)
    for name in ("train", "eval", "test"):
        with open(os.path.join(folder, f"new_aan_pairs.{name}.tsv"), "w") as f:
            for i in range(per_split):
                d1, d2 = (alphabet[rng.integers(0, len(alphabet), max_len)].tobytes().decode()
                          for _ in range(2))
                f.write(f"{i % 2}\tdoc{i}a\tdoc{i}b\t{d1}\t{d2}\n")


@contextlib.contextmanager
def data_for(config, mock: bool):
    """Yields the data column's text; with mock, points the config at mock/synthetic data."""
    task = config.data.task
    if config.data.data_dir or not mock or task in ("listops", "pathfinder", "pathx"):
        generated = task in ("listops", "pathfinder", "pathx") and not config.data.data_dir
        yield "generated" if generated else "real files"
        return
    if task == "retrieval":
        with tempfile.TemporaryDirectory() as tmp:
            write_synthetic_aan(tmp, config.data.max_len)
            config.data.data_dir = tmp
            yield "synthetic TSV (release format)"
        return
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=2 * max(config.data.batch_size, 256)):
        yield "tfds mock_data"


def bench(spec: str, steps: int, rounds: int, mock: bool = False) -> dict:
    config = load(spec)
    with tempfile.TemporaryDirectory() as cache:
        config.data.cache_dir = cache
        with data_for(config, mock) as data:
            s = setup(config)
            # two more copies of the training split on which nothing is generated yet
            fresh_build, fresh_fed = (lra.get_task(config.data).splits["train"]
                                      for _ in range(2))
        first = _build_times(fresh_build, config, range(1, 11))
        return _bench(spec, config, s, data, steps, rounds, first, fresh_fed)


def _build_times(src, config, steps) -> float:
    """Median seconds to build one training batch, serially (no threads)."""
    times = []
    for step in steps:
        t = time.perf_counter()
        pipeline._gather(src, pipeline.train_indices(len(src), config.data.batch_size,
                                                     config.seed, step))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bench(spec, config, s, data, steps, rounds, first, fresh_fed) -> dict:
    src = s.task.splits["train"]
    bs = config.data.batch_size
    batches = pipeline.train_batches(src, bs, seed=config.seed, workers=config.data.workers)
    state = s.state
    fixed = jax.device_put(next(batches), s.data_sharding)
    step_no = jnp.asarray(0, jnp.int32)
    state, m = s.train_step(state, fixed, step_no)  # compile
    jax.block_until_ready(m)

    def fed(batches=batches, steps=steps):
        nonlocal state
        t = time.perf_counter()
        for _ in range(steps):
            state, m = s.train_step(state, jax.device_put(next(batches), s.data_sharding),
                                       step_no)
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    # first epoch of a fresh source: generated tasks make their images in the prefetch threads
    first_steps = min(steps, len(fresh_fed) // bs)
    fed_first = fed(pipeline.train_batches(fresh_fed, bs, seed=config.seed,
                                           workers=config.data.workers), first_steps)

    def preloaded():
        nonlocal state
        t = time.perf_counter()
        for _ in range(steps):
            state, m = s.train_step(state, fixed, step_no)
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    fed(), preloaded()  # warm both paths
    a, b = [], []
    for _ in range(rounds):
        a.append(fed())
        b.append(preloaded())
    fa, fb = statistics.median(a), statistics.median(b)
    build = _build_times(src, config, range(1, 1 + max(steps, 10)))   # batches seen above
    return {"config": spec, "task": s.task.name, "data": data, "batch": bs,
            "max_len": config.data.max_len, "step_ms_pipeline": 1e3 * fa,
            "step_ms_preloaded": 1e3 * fb, "pipeline_cost_pct": 100 * (fa - fb) / fb,
            "step_ms_pipeline_first": 1e3 * fed_first,
            "pipeline_cost_pct_first": 100 * (fed_first - fb) / fb,
            "build_ms_first": 1e3 * first, "build_pct_first": 100 * first / fb,
            "build_ms": 1e3 * build, "build_pct": 100 * build / fb}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+")
    p.add_argument("--all_tiny", action="store_true", help="every task's tiny config")
    p.add_argument("--mock", action="store_true",
                   help="text/image: tfds mock_data; retrieval: synthetic release-format TSV")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="results/pipeline_cpu")
    a = p.parse_args(argv)
    specs = (a.configs or []) + (ALL_TINY if a.all_tiny else [])
    if not specs:
        p.error("give --configs and/or --all_tiny")
    rows = [bench(spec, a.steps, a.rounds, a.mock) for spec in specs]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    cols = list(rows[0])
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    head = (f"Input pipeline cost. {datetime.date.today()}, {platform.node()} "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
            f"jax {jax.__version__} on {jax.default_backend()}; {a.rounds} rounds x {a.steps} "
            f"steps, medians.\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                       for v in r.values()) + " |")
    text = head + "\n".join(lines) + "\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
