"""Attention op benchmark: forward+backward time, compiled FLOPs and temp memory vs dense.

    python -m tools.bench_attention [--variants all|a,b] [--lengths 1024,2048,4096,8192,16384]
                                    [--out results/attention_cpu]

For every registered variant (or --variants; dense is always added as the baseline) and every
length n, the gradient of sum(out * ct) w.r.t. q, k, v [batch, n, heads, head_dim] (float32,
an all-real kv_mask as the model passes one) is compiled with jax.jit; XLA's cost_analysis()
FLOPs and memory_analysis() temporary bytes are read from the compiled program, and it is run:
after --warmup runs, --repeats timed runs (each ended by block_until_ready), median reported.
Runs are interleaved round-robin over the variants of a length, so load changes on a shared
machine hit every variant alike; ratios are to dense measured in the same invocation.
A variant whose compiled buffers exceed --memory-gib is compiled but not run ("no fit"); one
whose single run exceeds --max-seconds is timed once. Hyperparameters: the registry defaults
updated by configs/variants.py for --task (LRA-like); grid variants (hyperparameter `shape`)
see n as a near-square grid. Writes OUT.md and OUT.csv, with the machine, CPU, versions and
date at the top.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from tools.common import header_lines, machine_info, markdown_table, write_csv, write_text
from tools.compiled import compile_fn, has_loop, matmul_flops, memory, xla_flops

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def near_square(n: int) -> tuple[int, int]:
    """(rows, cols), rows * cols == n, rows the largest divisor <= sqrt(n)."""
    r = math.isqrt(n)
    while n % r:
        r -= 1
    return r, n // r


def hparams(name: str, n: int, task: str) -> dict:
    import attention
    from configs import variants as variant_table

    hp = attention.hparams_for(name, variant_table.for_task(name, task))
    if "shape" in hp:
        hp["shape"] = near_square(n)
    if "num_prefix" in hp:
        hp["num_prefix"] = 0
    return hp


def build(name: str, n: int, *, batch: int, heads: int, head_dim: int, task: str):
    """-> (compiled fwd+bwd, its arguments' shapes, hyperparameters, cost dict)."""
    import jax
    import jax.numpy as jnp

    import attention

    variant = attention.get(name)
    hp = hparams(name, n, task)
    state = variant.init_state(jax.random.key(0), q_len=n, kv_len=n, num_heads=heads,
                               head_dim=head_dim, **hp)
    arrays = {**state["params"], **state["buffers"]}

    def step(q, k, v, kv_mask, ct, arrays):
        def loss(q, k, v):
            out = variant.fn(q, k, v, kv_mask=kv_mask, causal=False, **hp, **arrays)
            return jnp.sum(out * ct)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    x = jax.ShapeDtypeStruct((batch, n, heads, head_dim), jnp.float32)  # [B, T, H, D]
    shapes = (x, x, x, jax.ShapeDtypeStruct((batch, n), jnp.bool_), x,
              jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays))
    compiled, compile_s = compile_fn(step, shapes)
    mem = memory(compiled)
    looped = has_loop(compiled)
    # XLA's cost analysis counts a while-loop body once; count loops' matmuls from the jaxpr.
    flops = matmul_flops(jax.make_jaxpr(step)(*shapes).jaxpr) if looped else xla_flops(compiled)
    info = {"flops": float(flops), "flops_from_jaxpr": looped,
            "temp_bytes": mem["temp_bytes"],
            "buffer_bytes": mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"],
            "compile_s": compile_s}
    return compiled, arrays, hp, info


def bench_length(names, n, *, batch, heads, head_dim, task, warmup, repeats, max_seconds,
                 memory_gib, echo=print) -> dict:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(n), 4)
    shape = (batch, n, heads, head_dim)
    q, k, v, ct = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
    mask = jnp.ones((batch, n), bool)
    cells, ready = {}, {}
    for name in names:
        try:
            compiled, arrays, hp, info = build(name, n, batch=batch, heads=heads,
                                               head_dim=head_dim, task=task)
        except Exception as e:  # noqa: BLE001  (recorded in the table)
            cells[name] = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0]}"}
            echo(f"n={n} {name}: {cells[name]['status']}")
            continue
        cell = {"hp": hp, **info, "times": []}
        cells[name] = cell
        if info["buffer_bytes"] > memory_gib * 2**30:
            cell["status"] = f"no fit (> {memory_gib:g} GiB)"
        else:
            run = lambda c=compiled, a=arrays: jax.block_until_ready(c(q, k, v, mask, ct, a))  # noqa
            t0 = time.perf_counter()
            for _ in range(warmup):
                run()
            first = (time.perf_counter() - t0) / max(warmup, 1)
            cell["status"] = "ok"
            cell["rounds"] = repeats if first <= max_seconds else 1
            ready[name] = run
        echo(f"n={n} {name}: {info['flops']:.3g} flops, {info['temp_bytes'] / 2**20:.1f} MiB "
             f"temp, compile {info['compile_s']:.1f}s, {cell['status']}")
    for r in range(repeats):  # round-robin: each variant once per round
        for name, run in ready.items():
            if r < cells[name]["rounds"]:
                t0 = time.perf_counter()
                run()
                cells[name]["times"].append(time.perf_counter() - t0)
    for name in ready:
        cells[name]["time_s"] = statistics.median(cells[name]["times"])
        echo(f"n={n} {name}: {cells[name]['time_s']:.3f}s (median of "
             f"{len(cells[name]['times'])})")
    jax.clear_caches()
    return cells


def _fmt_ratio(x):
    return "-" if x is None else (f"{x:.1f}x" if x >= 10 else f"{x:.2f}x")


def _klabel(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _hp_text(hp):
    return ", ".join(f"{k}={v}" for k, v in hp.items()
                     if k not in ("num_prefix",)) or "-"


def tables(result) -> tuple[list[str], list[str], list[list]]:
    """(Markdown lines, CSV header, CSV rows)."""
    import attention

    s, cells = result["settings"], result["cells"]
    lengths, names = s["lengths"], s["variants"]
    env = result["environment"]
    lines = header_lines("Attention on CPU: forward + backward time, FLOPs and memory", env)
    lines += [
        f"Gradient of sum(out * ct) w.r.t. q, k, v [batch {s['batch']}, n, heads {s['heads']}, "
        f"head_dim {s['head_dim']}] float32 with an all-real kv_mask, one jitted program per "
        f"variant and n; time: median of {s['repeats']} runs after {s['warmup']} warmup, "
        f"interleaved round-robin over the variants of each n (a cell timed once is marked "
        f"`(1)`). FLOPs: XLA cost_analysis of the compiled program (`*`: the program has a "
        f"while loop, which XLA counts once, so the matmul FLOPs are counted from the jaxpr "
        f"with loop trip counts). Temp: memory_analysis temporary bytes. Ratios: against dense "
        f"at the same n in this run (speedup = dense time / variant time; FLOPs and memory = "
        f"variant / dense). Hyperparameters: registry defaults with configs/variants.py for "
        f"the `{s['task']}` task; grids are near-square (rows x cols = n). "
        f"Dense is run only where its buffers fit in {s['memory_gib']:g} GiB.", ""]

    def ratio(name, n, key, invert=False):
        a, d = cells[n].get(name, {}), cells[n].get("dense", {})
        if a.get(key) is None or d.get(key) is None or not d.get(key) or not a.get(key):
            return None
        return d[key] / a[key] if invert else a[key] / d[key]

    header = ["Variant", "Complexity"] + [_klabel(n) for n in lengths]
    lines += ["## Forward + backward time (s) and speedup vs dense", ""]
    rows = []
    for name in names:
        row = [name, attention.get(name).complexity]
        for n in lengths:
            c = cells[n].get(name, {})
            if c.get("time_s") is None:
                row.append(c.get("status", "-"))
                continue
            text = f"{c['time_s']:.3g}"
            if len(c["times"]) == 1:
                text += " (1)"
            sp = ratio(name, n, "time_s", invert=True)
            row.append(text + (f" ({_fmt_ratio(sp)})" if sp is not None and name != "dense"
                               else ""))
        rows.append(row)
    lines += markdown_table(header, rows, ["l", "l"] + ["r"] * len(lengths)) + [""]

    for key, title, fmt in (("flops", "Compiled FLOPs (G) and ratio to dense",
                             lambda c: f"{c['flops'] / 1e9:.3g}" + ("*" if c["flops_from_jaxpr"]
                                                                     else "")),
                            ("temp_bytes", "Compiled temp memory (MiB) and ratio to dense",
                             lambda c: f"{c['temp_bytes'] / 2**20:.1f}")):
        lines += [f"## {title}", ""]
        rows = []
        for name in names:
            row = [name, attention.get(name).complexity]
            for n in lengths:
                c = cells[n].get(name, {})
                if c.get(key) is None:
                    row.append(c.get("status", "-"))
                    continue
                r = ratio(name, n, key)
                row.append(fmt(c) + (f" ({_fmt_ratio(r)})" if r is not None and name != "dense"
                                     else ""))
            rows.append(row)
        lines += markdown_table(header, rows, ["l", "l"] + ["r"] * len(lengths)) + [""]

    lines += ["## Hyperparameters", ""]
    hp_rows = []
    for name in names:
        hps = {n: _hp_text(cells[n][name]["hp"]) for n in lengths if "hp" in cells[n].get(name, {})}
        distinct = sorted(set(hps.values()), key=list(hps.values()).index)
        hp_rows.append([name, "; ".join(distinct) if len(distinct) <= 1 else
                        "; ".join(f"{_klabel(n)}: {h}" for n, h in hps.items())])
    lines += markdown_table(["Variant", "Hyperparameters"], hp_rows, ["l", "l"]) + [""]

    csv_header = ["variant", "complexity", "length", "status", "time_median_s", "time_min_s",
                  "runs", "speedup_vs_dense", "flops", "flops_from_jaxpr", "flops_ratio",
                  "temp_bytes", "temp_ratio", "compile_s", "hparams"]
    csv_rows = []
    for name in names:
        for n in lengths:
            c = cells[n].get(name, {})
            times = c.get("times") or []
            csv_rows.append([
                name, attention.get(name).complexity, n, c.get("status"), c.get("time_s"),
                min(times) if times else None, len(times),
                ratio(name, n, "time_s", invert=True), c.get("flops"),
                c.get("flops_from_jaxpr"), ratio(name, n, "flops"), c.get("temp_bytes"),
                ratio(name, n, "temp_bytes"),
                None if c.get("compile_s") is None else round(c["compile_s"], 2),
                _hp_text(c["hp"]) if "hp" in c else None])
    return lines, csv_header, csv_rows


def parse_variants(text: str) -> list[str]:
    import attention

    if text == "all":
        names = attention.names()
    else:
        names = [x.strip() for x in text.split(",") if x.strip()]
        for name in names:
            attention.get(name)  # unknown: ValueError listing the valid names
    return ["dense"] + [n for n in names if n != "dense"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="all", help='"all" or a comma-separated list')
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--out", default="results/attention_cpu", help="writes OUT.md and OUT.csv")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--task", default="text", help="whose per-variant hyperparameters to use")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="a variant whose run takes longer than this is timed once")
    p.add_argument("--memory-gib", type=float, default=12.0,
                   help="compiled buffers above this are not run")
    p.add_argument("--note", default="", help="free text for the table header")
    a = p.parse_args(argv)

    names = parse_variants(a.variants)
    lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"--lengths: positive integers needed; got {a.lengths!r}")
    for flag in ("batch", "heads", "head_dim", "repeats"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    env = machine_info(note=a.note)
    cells = {}
    for n in lengths:
        cells[n] = bench_length(names, n, batch=a.batch, heads=a.heads, head_dim=a.head_dim,
                                task=a.task, warmup=a.warmup, repeats=a.repeats,
                                max_seconds=a.max_seconds, memory_gib=a.memory_gib)
    settings = {"lengths": lengths, "variants": names, "batch": a.batch, "heads": a.heads,
                "head_dim": a.head_dim, "task": a.task, "warmup": a.warmup,
                "repeats": a.repeats, "memory_gib": a.memory_gib}
    lines, header, rows = tables({"environment": env, "settings": settings, "cells": cells})
    write_text(a.out + ".md", lines)
    write_csv(a.out + ".csv", header, rows)
    print(f"-> {a.out}.md, {a.out}.csv")


if __name__ == "__main__":
    main()
