"""Input-pipeline cost: a training step fed by the real pipeline vs the same step on a
preloaded batch, and the host time to build one batch.

    python -m tools.bench_pipeline --configs configs/listops.py:dense,tiny configs/listops.py:dense,small
        [--steps 50] [--rounds 3] [--out results/pipeline_cpu]
    python -m tools.bench_pipeline --all_tiny --mock     # every task's tiny config
    python -m tools.bench_pipeline --all_tiny --mock --generation   # + serial vs parallel generation

Rounds alternate the two modes; the table gives the median step time of each, the pipeline's
cost (fed - preloaded) / preloaded (two noisy timings on a shared machine), and build_pct: the
mean serial time to build one batch / the preloaded step time, i.e. the cost if the
prefetch threads overlapped nothing (an upper bound that does not depend on the overlap).
*_first columns use a freshly built copy of the split: step_ms_pipeline_first is one round of
fed steps through its first epoch (generated Pathfinder images are drawn then, memoized
afterwards), in the mode the pipeline picks for the run (`first_mode`: threads, or grain worker
processes when much is left to draw); for generated sources the round is also run in the other
mode (`*_first_threads`, `*_first_processes`, each on a fresh copy; the first batch, which
waits for the workers to start, is taken before the clock starts). build_ms_first is the serial
build of unseen batches, as the pipeline builds them (unmade examples made for a group of
batches at once; the mean over two groups); build_ms times batches already seen.

--generation adds a second table: generating data with one process and with every core (ListOps
at the published lengths, Pathfinder-32 and Path-X images in the release layout), the files
checked identical.

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
            # more copies of the training split on which nothing is generated yet
            fresh = [lra.get_task(config.data).splits["train"] for _ in range(4)]
        first = _build_times(fresh[0], config,
                             range(2 * pipeline.draw_ahead(config.data.batch_size)))
        return _bench(spec, config, s, data, steps, rounds, first, fresh[1:])


def _build_times(src, config, steps) -> float:
    """Mean seconds to build one training batch serially (no threads), as the pipeline builds
    it: unmade examples are made a group of batches at a time, so `steps` spans whole groups."""
    bs = config.data.batch_size
    make = pipeline.TrainBatch(src, bs, config.seed, pipeline.draw_ahead(bs))
    t = time.perf_counter()
    for step in steps:
        make(step)
    return (time.perf_counter() - t) / len(steps)


def _bench(spec, config, s, data, steps, rounds, first, fresh) -> dict:
    src = s.task.splits["train"]
    bs, workers = config.data.batch_size, config.data.workers
    batches = pipeline.train_batches(src, bs, seed=config.seed, workers=workers)
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

    def first_epoch(source, processes=None):
        """Fed steps through the first epoch of a fresh source (first batch before the clock)."""
        it = pipeline.train_batches(source, bs, seed=config.seed, workers=workers,
                                    processes=processes)
        next(it)
        try:
            return fed(it, min(steps, len(source) // bs - 1))
        finally:
            it.close()

    generated = src.pending(np.arange(len(src))) > 0
    mode = ("processes" if pipeline.uses_processes(fresh[0], np.arange(len(fresh[0])), workers)
            else "threads")
    fed_first = first_epoch(fresh[0])
    other = {}
    if generated:
        other["threads"] = fed_first if mode == "threads" else first_epoch(fresh[1], False)
        other["processes"] = fed_first if mode == "processes" else first_epoch(fresh[2], True)

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
    batches.close()
    fa, fb = statistics.median(a), statistics.median(b)
    build = _build_times(src, config, range(max(steps, 10)))   # batches seen above
    row = {"config": spec, "task": s.task.name, "data": data, "batch": bs,
           "max_len": config.data.max_len, "step_ms_pipeline": 1e3 * fa,
           "step_ms_preloaded": 1e3 * fb, "pipeline_cost_pct": 100 * (fa - fb) / fb,
           "first_mode": mode, "step_ms_pipeline_first": 1e3 * fed_first,
           "pipeline_cost_pct_first": 100 * (fed_first - fb) / fb}
    for name in ("threads", "processes"):
        t = other.get(name)
        row[f"pipeline_cost_pct_first_{name}"] = "" if t is None else 100 * (t - fb) / fb
    row.update({"build_ms_first": 1e3 * first, "build_pct_first": 100 * first / fb,
                "build_ms": 1e3 * build, "build_pct": 100 * build / fb})
    return row


def _tree_bytes(root: str) -> dict:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def bench_generation(listops_num: int, pf_num: int, pathx_num: int):
    """Rows: seconds to generate with one process and with every core; outputs compared."""
    from lra import listops, pathfinder

    cores = os.cpu_count() or 1
    jobs = [("listops (published lengths 500-2000)", listops_num, "examples",
             lambda out, p: listops.generate_files(out, num_train=listops_num, num_val=0,
                                                   num_test=0, seed=0, processes=p)),
            ("pathfinder32 hard, release layout", pf_num, "images",
             lambda out, p: pathfinder.write_release(out, 32, "hard", pf_num, 0, processes=p)),
            ("pathx (128) hard, release layout", pathx_num, "images",
             lambda out, p: pathfinder.write_release(out, 128, "hard", pathx_num, 0,
                                                     chunk=32, processes=p))]
    for what, num, unit, run in jobs:
        if num <= 0:
            continue
        secs, trees = {}, {}
        for procs in (1, cores):
            with tempfile.TemporaryDirectory() as out:
                load = os.getloadavg()[0]
                t = time.perf_counter()
                run(out, procs)
                secs[procs] = (time.perf_counter() - t, load)
                trees[procs] = _tree_bytes(out)
        yield {"data": what, "count": num, "unit": unit,
               "serial_s": secs[1][0], "load_serial": secs[1][1],
               "processes": cores, "parallel_s": secs[cores][0], "load_parallel": secs[cores][1],
               "speedup": secs[1][0] / secs[cores][0],
               "serial_per_s": num / secs[1][0], "parallel_per_s": num / secs[cores][0],
               "identical_files": trees[1] == trees[cores]}


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                       for v in r.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+")
    p.add_argument("--all_tiny", action="store_true", help="every task's tiny config")
    p.add_argument("--mock", action="store_true",
                   help="text/image: tfds mock_data; retrieval: synthetic release-format TSV")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--generation", action="store_true",
                   help="also time generation with 1 process and with every core")
    p.add_argument("--listops_num", type=int, default=2000)
    p.add_argument("--pathfinder_num", type=int, default=2000)
    p.add_argument("--pathx_num", type=int, default=128)
    p.add_argument("--out", default="results/pipeline_cpu")
    a = p.parse_args(argv)
    specs = (a.configs or []) + (ALL_TINY if a.all_tiny else [])
    if not specs and not a.generation:
        p.error("give --configs, --all_tiny and/or --generation")
    for name in ("steps", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(a, name)}")
    load0 = os.getloadavg()
    rows, gen_rows = [], []
    for spec in specs:                       # the files are rewritten after every row
        rows.append(bench(spec, a.steps, a.rounds, a.mock))
        write(a, rows, gen_rows, load0)
    if a.generation:
        for row in bench_generation(a.listops_num, a.pathfinder_num, a.pathx_num):
            gen_rows.append(row)
            write(a, rows, gen_rows, load0)
    print(open(a.out + ".md").read())


def write(a, rows: list[dict], gen_rows: list[dict], load0) -> None:
    load1 = os.getloadavg()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    for suffix, table in (("", rows), ("_generation", gen_rows)):
        if table:
            with open(a.out + suffix + ".csv", "w", newline="") as f:
                w = csv.DictWriter(f, list(table[0]))
                w.writeheader()
                w.writerows(table)
    head = (f"Input pipeline cost. {datetime.date.today()}, {platform.node()} "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
            f"jax {jax.__version__} on {jax.default_backend()}; load average (1 min) "
            f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the last row.\n\n")
    text = head
    if rows:
        text += (f"Training step fed by the pipeline vs preloaded: {a.rounds} rounds x "
                 f"{a.steps} steps, medians.\n\n" + _table(rows))
    if gen_rows:
        text += ("\nGeneration with 1 process and with every core (wall seconds; load average "
                 "at the start of each):\n\n" + _table(gen_rows))
    with open(a.out + ".md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
