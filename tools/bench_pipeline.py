"""Input-pipeline cost: a training step fed by the real pipeline vs the same step on a
preloaded batch.

    python -m tools.bench_pipeline --configs configs/listops.py:dense,tiny configs/listops.py:dense,small
        [--steps 50] [--rounds 3] [--out results/pipeline_cpu]

Rounds alternate the two modes; the table gives the median step time of each and the
pipeline's cost (fed - preloaded) / preloaded. Writes <out>.md and <out>.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from configs.loader import load
from lra import pipeline
from training.loop import setup


def bench(spec: str, steps: int, rounds: int) -> dict:
    config = load(spec)
    s = setup(config)
    src = s["task"].splits["train"]
    bs = config.data.batch_size
    batches = pipeline.train_batches(src, bs, seed=config.seed, workers=config.data.workers)
    state = s["state"]
    fixed = jax.device_put(next(batches), s["data_sharding"])
    step_no = jnp.asarray(0, jnp.int32)
    state, m = s["train_step"](state, fixed, step_no)  # compile
    jax.block_until_ready(m)

    def fed():
        nonlocal state
        t = time.perf_counter()
        for _ in range(steps):
            state, m = s["train_step"](state, jax.device_put(next(batches), s["data_sharding"]),
                                       step_no)
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    def preloaded():
        nonlocal state
        t = time.perf_counter()
        for _ in range(steps):
            state, m = s["train_step"](state, fixed, step_no)
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    fed(), preloaded()  # warm both paths
    a, b = [], []
    for _ in range(rounds):
        a.append(fed())
        b.append(preloaded())
    fa, fb = statistics.median(a), statistics.median(b)
    return {"config": spec, "task": s["task"].name, "batch": bs,
            "max_len": config.data.max_len, "step_ms_pipeline": 1e3 * fa,
            "step_ms_preloaded": 1e3 * fb, "pipeline_cost_pct": 100 * (fa - fb) / fb}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="results/pipeline_cpu")
    a = p.parse_args(argv)
    rows = [bench(spec, a.steps, a.rounds) for spec in a.configs]
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
