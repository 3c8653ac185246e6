"""GPU benchmark of the Pallas kernels (attention/pallas/): time and TFLOP/s, ratios, goals.

    python -m tools.bench_pallas_gpu                  # on a GPU: results/pallas_gpu.{md,csv}
    python -m tools.bench_pallas_gpu --causal         # also the causal rows
    python -m tools.bench_pallas_gpu --smoke          # CPU, interpret mode, tiny sizes: checks
                                                      # the script works (writes to $TMPDIR)

Three tables, bfloat16, BTNH layout, B = max(1, 16K / n) sequences of n tokens, H = 2048 / D
heads (FlashAttention-2's benchmark setup):
  1. dense: our block-sparse flash kernel with every tile listed vs jax.nn.dot_product_attention
     (implementation "xla" and "cudnn") and JAX's Pallas `mha` (jax.experimental.pallas.ops.gpu.
     attention), forward and forward+backward, n = 1K..16K, D = 64 and 128. TFLOP/s counts
     4 n^2 D B H per forward (half when causal) and 2.5x that for the backward (FA-2's
     convention). Our tiles: the fastest of --tiles per cell (written in the table).
  2. block-sparse: each fixed pattern at --sparse-n, D = 64, at several densities; density =
     listed tiles / all tiles of the kernel's block mask (the work it does); ratio = time /
     (density x dense time), dense = our kernel in the same run.
  3. linear: chunked linear attention (`linear`, and `performer` FAVOR+ with 256 features) vs our
     dense flash kernel, n = 1K..16K, D = 64.
Timing: jit, two warm-up calls, then the median over --repeats groups of calls (each group long
enough to time, ended by block_until_ready). A cell that fails (out of memory, cuDNN absent, a
lowering error) is recorded with its error instead of a time. The goals (the kernels
against their baselines) are checked at the end from the measured rows.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attention  # noqa: E402
from attention.pallas import block_mask as bm  # noqa: E402
from tools.common import (REPO_ROOT, header_lines, machine_info, markdown_table,  # noqa: E402
                          write_csv, write_text)

COLUMNS = ["table", "impl", "pattern", "hparams", "n", "head_dim", "batch", "heads", "causal",
           "mode", "time_ms", "tflops", "density", "ratio", "tiles", "note"]

# Pattern hyperparameters at several densities for a sequence of n tokens (table 2).
def sparse_cases(n: int, smoke: bool):
    s = max(1, n // 4096) if not smoke else 1
    if smoke:
        return [
            ("local", {"window": 16}), ("strided", {"stride": 80}),
            ("sparse", {"window": 8, "stride": 96}),
            ("sparse_fixed", {"block_size": 64, "summary": 8}),
            ("longformer", {"window": 16, "num_global": 1}),
            ("bigbird", {"block_size": 32, "num_window_blocks": 3, "num_global_blocks": 2,
                         "num_random_blocks": 1}),
        ]
    return [
        ("local", {"window": 64 * s}), ("local", {"window": 256 * s}),
        ("local", {"window": 1024 * s}),
        ("strided", {"stride": 512 * s}), ("strided", {"stride": 2048 * s}),
        ("sparse", {"window": 128 * s, "stride": 1024 * s}),
        ("sparse_fixed", {"block_size": 256, "summary": 16}),
        ("sparse_fixed", {"block_size": 1024, "summary": 32}),
        ("longformer", {"window": 256 * s, "num_global": 1}),
        ("bigbird", {"block_size": 64, "num_window_blocks": 3, "num_global_blocks": 2,
                     "num_random_blocks": 3}),
        ("bigbird", {"block_size": 128, "num_window_blocks": 3, "num_global_blocks": 2,
                     "num_random_blocks": 3}),
    ]


# ----------------------------------------------------------------------------------- timing


def time_call(fn, args, repeats: int, min_group_s: float) -> float:
    """Median seconds per call over `repeats` groups (after two warm-up calls)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    per_group = max(1, min(1000, int(min_group_s / once)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_group):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / per_group)
    return statistics.median(samples)


def fwd_and_train(attend):
    """(forward, forward+backward) jitted functions of q, k, v (and a cotangent)."""
    fwd = jax.jit(attend)

    @jax.jit
    def train(q, k, v, ct):
        out, vjp = jax.vjp(attend, q, k, v)
        return vjp(ct)

    return fwd, train


def attention_flops(n, d, b, h, causal, mode):
    f = 4.0 * n * n * d * b * h * (0.5 if causal else 1.0)
    return f if mode == "fwd" else 3.5 * f


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
        return "out of memory"
    return msg[:160]


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.interpret = args.smoke
        self.dtype = jnp.bfloat16

    def inputs(self, n, d, b, h, seed=0):
        keys = jax.random.split(jax.random.key(seed), 4)
        return [jax.random.normal(kk, (b, n, h, d), self.dtype) for kk in keys]

    def measure(self, row: dict, attend, q, k, v, ct, modes=("fwd", "train")):
        """Times forward and forward+backward of attend(q, k, v); appends one row per mode."""
        fwd, train = fwd_and_train(attend)
        results = {}
        for mode in modes:
            r = dict(row, mode="fwd" if mode == "fwd" else "fwd+bwd")
            try:
                fn, fn_args = (fwd, (q, k, v)) if mode == "fwd" else (train, (q, k, v, ct))
                t = time_call(fn, fn_args, self.args.repeats, self.args.min_group_s)
                r["time_ms"] = round(t * 1e3, 4)
                if row.get("flops_counted", True):
                    fl = attention_flops(row["n"], row["head_dim"], row["batch"], row["heads"],
                                         row["causal"], "fwd" if mode == "fwd" else "train")
                    r["tflops"] = round(fl / t / 1e12, 2)
                results[mode] = t
            except Exception as e:  # noqa: BLE001  (recorded in the table, run continues)
                r["note"] = _short_error(e)
                if self.args.verbose:
                    traceback.print_exc()
            r.pop("flops_counted", None)
            self.rows.append(r)
            print(" | ".join(f"{c}={r.get(c)}" for c in COLUMNS if r.get(c) not in (None, "")),
                  flush=True)
        return results

    # ------------------------------------------------------------------------------ tables

    def ours_dense(self, causal, tiles):
        bq, bk = tiles

        def attend(q, k, v):
            return attention.get("dense")(q, k, v, impl="pallas", causal=causal, block_q=bq,
                                          block_k=bk, interpret=self.interpret)
        return attend

    def dense_table(self):
        a = self.args
        for d in a.head_dims:
            for n in a.lengths:
                for causal in a.causal_modes:
                    b, h = max(1, a.tokens // n), max(1, a.hidden // d)
                    q, k, v, ct = self.inputs(n, d, b, h)
                    base = dict(table="dense", pattern="dense", n=n, head_dim=d, batch=b,
                                heads=h, causal=causal)
                    # ours: the fastest tile configuration per mode
                    best = {}
                    for tiles in a.tiles:
                        if max(tiles) > n:
                            continue
                        start = len(self.rows)
                        res = self.measure(dict(base, impl="pallas (ours)",
                                                tiles=f"{tiles[0]}x{tiles[1]}"),
                                           self.ours_dense(causal, tiles), q, k, v, ct)
                        for idx, mode in zip(range(start, len(self.rows)), ("fwd", "train")):
                            if mode in res and (mode not in best or res[mode] < best[mode][0]):
                                best[mode] = (res[mode], idx)
                    for mode, (_, idx) in best.items():
                        self.rows[idx]["note"] = (self.rows[idx].get("note") or "") + "best"
                    for impl in ("xla", "cudnn"):
                        def attend(q, k, v, impl=impl):
                            return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                implementation=impl)
                        self.measure(dict(base, impl=f"dot_product_attention[{impl}]"),
                                     attend, q, k, v, ct)
                    self.measure(dict(base, impl="pallas mha (jax)"),
                                 self.jax_mha(causal, d), q, k, v, ct)

    def jax_mha(self, causal, d):
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

        def attend(q, k, v):
            return gpu_attention.mha(q, k, v, None, sm_scale=1.0 / math.sqrt(d), causal=causal,
                                     interpret=self.interpret)
        return attend

    def sparse_table(self):
        a = self.args
        n, d = a.sparse_n, 64
        b, h = max(1, a.tokens // n), max(1, a.hidden // d)
        q, k, v, ct = self.inputs(n, d, b, h)
        tiles = a.tiles[0]
        for causal in a.causal_modes:
            base = dict(table="block-sparse", n=n, head_dim=d, batch=b, heads=h, causal=causal,
                        tiles=f"{tiles[0]}x{tiles[1]}")
            dense = self.measure(dict(base, impl="pallas (ours)", pattern="dense", density=1.0,
                                      ratio=1.0), self.ours_dense(causal, tiles), q, k, v, ct)
            for name, hp in sparse_cases(n, a.smoke):
                state = attention.get(name).init_state(
                    jax.random.key(1), q_len=n, kv_len=n, num_heads=h, head_dim=d, **hp)
                extra = {**state["params"], **state["buffers"]}
                density, pairs = self.tile_density(name, hp, n, tiles, causal, extra)
                bq, bk = tiles
                if name == "bigbird":  # tiles must divide the pattern's block_size
                    bq, bk = min(bq, hp["block_size"]), min(bk, hp["block_size"])

                def attend(q, k, v, name=name, hp=hp, extra=extra, bq=bq, bk=bk):
                    return attention.get(name)(q, k, v, impl="pallas", causal=causal,
                                               block_q=bq, block_k=bk,
                                               interpret=self.interpret, **hp, **extra)
                row = dict(base, impl="pallas (ours)", pattern=name, hparams=_hp_str(hp),
                           density=round(density, 4), tiles=f"{bq}x{bk}",
                           note=f"pair density {pairs:.4f}", flops_counted=False)
                start = len(self.rows)
                res = self.measure(row, attend, q, k, v, ct)
                for idx, mode in zip(range(start, len(self.rows)), ("fwd", "train")):
                    if mode in res and mode in dense and density > 0:
                        self.rows[idx]["ratio"] = round(res[mode] / (density * dense[mode]), 3)

    def tile_density(self, name, hp, n, tiles, causal, extra):
        """(listed tiles / causal-or-all tiles of dense, kept pairs / all pairs)."""
        bq, bk = tiles
        if name == "bigbird":
            bq, bk = min(bq, hp["block_size"]), min(bk, hp["block_size"])
            listed, _ = bm.bigbird_states(
                n, n, bq, bk, block_size=hp["block_size"],
                num_window_blocks=hp["num_window_blocks"],
                num_global_blocks=hp["num_global_blocks"],
                random_layout=extra["random_layout"], causal=causal)
            listed = np.asarray(listed).mean(0)  # mean over heads
            pairs = float("nan")
        else:
            rule = bm.Rule.make(name, causal, **hp)
            listed, _ = bm.block_states(rule, n, n, bq, bk)
            keep = rule.keep(np.arange(n)[:, None], np.arange(n)[None, :])
            pairs = float(np.mean(np.broadcast_to(keep, (n, n))))
        dense_listed, _ = bm.block_states(bm.Rule.make(None, causal), n, n, bq, bk)
        return float(np.sum(listed) / np.sum(dense_listed)), pairs

    def linear_table(self):
        a = self.args
        d = 64
        for n in a.lengths:
            for causal in a.causal_modes:
                b, h = max(1, a.tokens // n), max(1, a.hidden // d)
                q, k, v, ct = self.inputs(n, d, b, h)
                base = dict(table="linear", n=n, head_dim=d, batch=b, heads=h, causal=causal)
                tiles = a.tiles[0]
                dense = self.measure(dict(base, impl="pallas (ours)", pattern="dense",
                                          tiles=f"{tiles[0]}x{tiles[1]}"),
                                     self.ours_dense(causal, tiles), q, k, v, ct)
                cases = [("linear", {}, "pallas"), ("linear", {}, "xla"),
                         ("performer", {"num_features": a.num_features}, "pallas")]
                for name, hp, impl in cases:
                    state = attention.get(name).init_state(
                        jax.random.key(1), q_len=n, kv_len=n, num_heads=h, head_dim=d, **hp)
                    extra = {**state["params"], **state["buffers"]}
                    kw = {"interpret": self.interpret} if impl == "pallas" else {}

                    def attend(q, k, v, name=name, hp=hp, extra=extra, impl=impl, kw=kw):
                        return attention.get(name)(q, k, v, impl=impl, causal=causal, **hp,
                                                   **extra, **kw)
                    label = "pallas (ours)" if impl == "pallas" else "xla (ours)"
                    start = len(self.rows)
                    res = self.measure(dict(base, impl=label, pattern=name,
                                            hparams=_hp_str(hp), flops_counted=False),
                                       attend, q, k, v, ct)
                    for idx, mode in zip(range(start, len(self.rows)), ("fwd", "train")):
                        if mode in res and mode in dense:
                            # here ratio = dense flash time / this time (> 1: faster)
                            self.rows[idx]["ratio"] = round(dense[mode] / res[mode], 3)


def _hp_str(hp: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in hp.items())


# ------------------------------------------------------------------------------------ goals


def _find(rows, **match):
    out = []
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and r.get("time_ms") not in (None, ""):
            out.append(r)
    return out


def goals(rows) -> list[str]:
    """The goals, checked against the measured rows (met / not met / not measured)."""
    lines = ["## Goals, checked on these rows", ""]

    def verdict(ok):
        return "met" if ok else "NOT met"

    checks = []
    for r in _find(rows, table="dense", impl="pallas (ours)"):
        if "best" not in (r.get("note") or ""):
            continue
        key = dict(table="dense", n=r["n"], head_dim=r["head_dim"], causal=r["causal"],
                   mode=r["mode"])
        mha = _find(rows, impl="pallas mha (jax)", **key)
        cudnn = _find(rows, impl="dot_product_attention[cudnn]", **key)
        cell = f"n={r['n']} D={r['head_dim']} causal={r['causal']} {r['mode']}"
        if mha:
            x = mha[0]["time_ms"] / r["time_ms"]
            checks.append(f"- dense vs JAX Pallas mha, {cell}: {x:.2f}x its speed "
                          f"(goal >= 1): {verdict(x >= 1.0)}")
        if cudnn:
            x = cudnn[0]["time_ms"] / r["time_ms"]
            checks.append(f"- dense vs cuDNN, {cell}: {x:.2f}x its speed (goal >= 0.7): "
                          f"{verdict(x >= 0.7)}")
    for r in _find(rows, table="block-sparse"):
        if r.get("pattern") != "dense" and r.get("ratio") not in (None, ""):
            checks.append(f"- {r['pattern']} ({r['hparams']}) causal={r['causal']} "
                          f"{r['mode']}: time / (density {r['density']} x dense) = "
                          f"{r['ratio']} (goal <= 1.25): {verdict(r['ratio'] <= 1.25)}")
    for r in _find(rows, table="linear", impl="pallas (ours)"):
        if r.get("pattern") in ("linear", "performer") and r["n"] >= 4096 \
                and r.get("ratio") not in (None, ""):
            checks.append(f"- {r['pattern']} n={r['n']} causal={r['causal']} {r['mode']}: "
                          f"{r['ratio']}x dense flash (goal > 1 from 4K): "
                          f"{verdict(r['ratio'] > 1.0)}")
    lines += checks or ["- nothing measured that the goals apply to"]
    return lines + [""]


# ------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU, interpret mode, tiny sizes: check that the script works")
    p.add_argument("--out", default=None, help="output path without extension")
    p.add_argument("--lengths", default=None, help="comma-separated n (default 1K..16K)")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tiles", default="64x64,128x64,128x128",
                   help="our kernel's block_q x block_k candidates (dense: fastest wins)")
    p.add_argument("--sparse-n", type=int, default=4096)
    p.add_argument("--num-features", type=int, default=256, help="performer features")
    p.add_argument("--tokens", type=int, default=16384, help="batch x n")
    p.add_argument("--hidden", type=int, default=2048, help="heads x head_dim")
    p.add_argument("--causal", action="store_true", help="also causal rows")
    p.add_argument("--tables", default="dense,sparse,linear")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-group-s", type=float, default=0.05)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths = args.lengths or "128,256"
        args.head_dims = "32"
        args.tiles = "32x32,64x32"
        args.sparse_n = 256
        args.num_features = 32
        args.tokens, args.hidden = 256, 64
        args.repeats, args.min_group_s = 1, 0.0
        args.out = args.out or os.path.join(tempfile.gettempdir(), "pallas_gpu_smoke")
    args.lengths = [int(x) for x in (args.lengths or "1024,2048,4096,8192,16384").split(",")]
    args.head_dims = [int(x) for x in args.head_dims.split(",")]
    args.tiles = [tuple(int(y) for y in x.split("x")) for x in args.tiles.split(",")]
    args.causal_modes = (False, True) if args.causal else (False,)
    args.tables = args.tables.split(",")
    args.out = args.out or os.path.join(REPO_ROOT, "results", "pallas_gpu")
    return args


def environment_lines(env) -> list[str]:
    extra = []
    try:
        from jax._src.lib import cuda_versions  # present in CUDA builds of jaxlib

        if cuda_versions is not None:
            extra.append(f"- CUDA runtime {cuda_versions.cuda_runtime_get_version()}, cuDNN "
                         f"{cuda_versions.cudnn_get_version()}")
    except Exception:  # noqa: BLE001
        pass
    return extra


def main(argv=None):
    args = parse_args(argv)
    if not args.smoke and jax.default_backend() != "gpu":
        raise SystemExit("bench_pallas_gpu: no GPU here (backend "
                         f"{jax.default_backend()!r}); run with --smoke to check the script")
    env = machine_info(note="smoke run: CPU interpret mode, tiny sizes; the times mean nothing"
                       if args.smoke else "")
    bench = Bench(args)
    if "dense" in args.tables:
        bench.dense_table()
    if "sparse" in args.tables:
        bench.sparse_table()
    if "linear" in args.tables:
        bench.linear_table()
    rows = bench.rows
    lines = header_lines("Pallas kernels on a GPU: flash, block-sparse and linear attention",
                         env) + environment_lines(env)
    lines += ["", "bfloat16, BTNH layout; B = max(1, tokens / n), H = hidden / D "
              f"(tokens {args.tokens}, hidden {args.hidden}). Time: median ms per call. "
              "TFLOP/s: 4 n^2 D B H per forward (x0.5 causal), x3.5 forward+backward. "
              "Written by tools/bench_pallas_gpu.py.", ""]
    titles = {"dense": "Dense attention", "block-sparse":
              f"Block-sparse patterns at n = {args.sparse_n} (ratio = time / (tile density x "
              "dense time))", "linear": "Linear attention vs dense flash (ratio = dense time / "
              "time)"}
    for table, title in titles.items():
        sub = [r for r in rows if r["table"] == table]
        if not sub:
            continue
        cols = [c for c in COLUMNS[1:] if any(r.get(c) not in (None, "") for r in sub)]
        lines += [f"## {title}", ""]
        align = ["l" if c in ("impl", "pattern", "hparams", "tiles", "note", "mode") else "r"
                 for c in cols]
        lines += markdown_table(cols, [[r.get(c) for c in cols] for r in sub], align)
        lines.append("")
    lines += goals(rows)
    if args.smoke:
        lines.append("(Smoke run: interpret mode on a CPU, so the verdicts above mean nothing.)")
    write_text(args.out + ".md", lines)
    write_csv(args.out + ".csv", COLUMNS, [[r.get(c) for c in COLUMNS] for r in rows])
    print(f"wrote {args.out}.md and {args.out}.csv")


if __name__ == "__main__":
    main()
