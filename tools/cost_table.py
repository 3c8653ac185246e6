"""Compiled cost of the attention op alone per variant and length, with the fitted growth exponent.

    python -m tools.cost_table --out results/ [--lengths 1024,2048,4096,8192,16384] [--grad]

For each registered variant (or --variants) and length n, the variant's function on
q, k, v [batch, n, heads, head_dim] (a kv_mask of all-real tokens, as the model passes one; the
variant's hyperparameters for the text task; its init_state arrays as arguments) is lowered and
compiled with jax.jit; XLA's cost_analysis() FLOPs and memory_analysis() temporary bytes are
read (deterministic for a given backend and version). Nothing is executed, so lengths beyond
what fits in memory can be listed. --grad adds the same for forward + backward (the gradient of
sum(out * cotangent) with respect to q, k, v and the variant's params).
Growth exponent: least-squares slope of log(cost) against log(n) over the lengths; claimed:
the exponent of the variant's registered complexity class. Grid variants see n as a
near-square grid. Writes OUT/<name>.md (+ .csv, .json).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from tools import bench_attention
from tools.common import header_lines, machine_info, markdown_table, write_csv, write_text
from tools.compiled import compile_fn, has_loop, matmul_flops_bounded, memory, xla_flops

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def variant_hparams(name: str, length: int, task: str = "text") -> dict:
    """The variant's hyperparameters for `task`, with a grid shape fitted to `length`
    (shared with tools.bench_attention, which times the same op)."""
    return bench_attention.hparams(name, length, task)


def attention_call(name: str, length: int, *, batch: int = 1, heads: int = 4,
                   head_dim: int = 64, task: str = "text", dtype="float32", seed: int = 0):
    """-> (f, args): f(q, k, v, kv_mask, params, buffers) -> out, and its example arguments."""
    import jax
    import jax.numpy as jnp

    import attention

    variant = attention.get(name)
    hp = variant_hparams(name, length, task)
    state = variant.init_state(jax.random.key(seed), q_len=length, kv_len=length,
                               num_heads=heads, head_dim=head_dim, **hp)
    shape = (batch, length, heads, head_dim)  # [B, T, H, D]
    q = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)  # [B, T]

    def f(q, k, v, kv_mask, params, buffers):
        return variant.fn(q, k, v, kv_mask=kv_mask, causal=False, **hp, **params, **buffers)

    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
    buffers = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["buffers"])
    return f, (q, q, q, mask, params, buffers), hp


def compiled_cost(f, args, *, grad: bool = False) -> dict:
    """FLOPs and temp bytes of jit(f) (or of its forward+backward when grad) at args."""
    import jax
    import jax.numpy as jnp

    if grad:
        def g(q, k, v, kv_mask, params, buffers):
            def loss(q, k, v, params):
                out = f(q, k, v, kv_mask, params, buffers)
                return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32)))
            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, params)
        fn = g
    else:
        fn = f
    compiled, seconds = compile_fn(fn, args)
    mem = memory(compiled)
    matmul, bounded = matmul_flops_bounded(jax.make_jaxpr(fn)(*args).jaxpr)
    flops = xla_flops(compiled)
    return {"flops": flops if flops is not None else None,
            "temp_bytes": mem.get("temp_bytes"),
            "matmul_flops": matmul, "matmul_lower_bound": bounded,
            # XLA's cost analysis counts a while-loop body once, whatever its trip count.
            "has_loop": has_loop(compiled),
            "compile_seconds": round(seconds, 2)}


def fit_exponent(lengths, values) -> float | None:
    """Least-squares slope of log(value) on log(length); None with < 2 positive points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(lengths, values)
           if v is not None and v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else None


def run(variants, lengths, *, batch=1, heads=4, head_dim=64, task="text", grad=False,
        echo=print) -> list[dict]:
    import jax

    import attention

    rows = []
    for name in variants:
        row = {"variant": name, "complexity": attention.get(name).complexity,
               "claimed_exponent": attention.COMPLEXITIES[attention.get(name).complexity],
               "cells": {}}
        for n in lengths:
            cell = {}
            try:
                f, args, hp = attention_call(name, n, batch=batch, heads=heads,
                                             head_dim=head_dim, task=task)
                cell["forward"] = compiled_cost(f, args)
                if grad:
                    cell["train"] = compiled_cost(f, args, grad=True)
                if "shape" in hp:
                    cell["grid"] = list(hp["shape"])
            except Exception as e:  # noqa: BLE001  (recorded in the table)
                cell["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            row["cells"][n] = cell
            echo(f"{name} n={n}: " + (cell.get("error") or
                                      f"{cell['forward']['flops']:.3g} flops (XLA), "
                                      f"{cell['forward']['matmul_flops']:.3g} matmul flops, "
                                      f"{cell['forward']['temp_bytes'] / 2**20:.1f} MiB temp"
                                      + (", loop" if cell["forward"]["has_loop"] else "")))
            jax.clear_caches()
        for part in ("forward", "train"):
            for key in ("flops", "matmul_flops", "temp_bytes"):
                vals = [row["cells"][n].get(part, {}).get(key) for n in lengths]
                row[f"{part}_{key}_exponent"] = fit_exponent(lengths, vals)
        rows.append(row)
    return rows


def _klabel(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _si(x):
    if x is None:
        return "-"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _mib(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def write_tables(result: dict, out: str, name: str) -> None:
    s = result["settings"]
    lengths = s["lengths"]
    lines = header_lines("Compiled cost of the attention op", result["environment"])
    lines += [f"The attention function alone on q, k, v [batch {s['batch']}, n, heads "
              f"{s['heads']}, head_dim {s['head_dim']}] float32 with a kv_mask, hyperparameters "
              f"of the `{s['task']}` task; XLA cost_analysis FLOPs and memory_analysis temporary "
              f"bytes of the compiled function (nothing executed), and the matmul FLOPs counted "
              f"from the jaxpr (every dot_general, scan bodies times their length). Exponent: "
              f"least-squares slope of log cost on log n; claimed: the registered complexity "
              f"class. `*`: the compiled program has a while loop, and XLA's cost analysis counts "
              f"a loop body once whatever its trip count, so its FLOPs are a lower bound there "
              f"(read the matmul table). `+`: a loop of data-dependent trip count was counted "
              f"once in the matmul count too.", ""]
    parts = ["forward"] + (["train"] if s["grad"] else [])
    for part in parts:
        title = "Forward" if part == "forward" else "Forward + backward"
        for key, fmt, label in (("flops", _si, "FLOPs (XLA cost analysis)"),
                                ("matmul_flops", _si, "matmul FLOPs (jaxpr, loops x trip count)"),
                                ("temp_bytes", _mib, "temp MiB")):
            lines += [f"## {title}: {label}", ""]
            header = (["Variant", "Complexity"] + [_klabel(n) for n in lengths]
                      + ["Exponent", "Claimed"])
            rows = []
            for r in result["rows"]:
                cells = [r["cells"][n] for n in lengths]
                vals = [fmt(c.get(part, {}).get(key)) if "error" not in c else "fail"
                        for c in cells]
                e = r.get(f"{part}_{key}_exponent")
                flag = ""
                if key == "flops" and any(c.get(part, {}).get("has_loop") for c in cells):
                    flag = " *"
                if key == "matmul_flops" and any(c.get(part, {}).get("matmul_lower_bound")
                                                 for c in cells):
                    flag = " +"
                rows.append([r["variant"] + flag, r["complexity"]] + vals
                            + ["-" if e is None else f"{e:.2f}", f"{r['claimed_exponent']:g}"])
            lines += markdown_table(header, rows, ["l", "l"] + ["r"] * (len(header) - 2)) + [""]
    errors = [f"- {r['variant']} at {n}: {r['cells'][n]['error']}" for r in result["rows"]
              for n in lengths if "error" in r["cells"][n]]
    grids = [f"{r['variant']} " + ", ".join(f"{n}: {r['cells'][n]['grid'][0]}x"
                                           f"{r['cells'][n]['grid'][1]}" for n in lengths
                                           if "grid" in r["cells"][n])
             for r in result["rows"] if any("grid" in r["cells"][n] for n in lengths)]
    if grids:
        lines += ["Grids: " + "; ".join(grids) + ".", ""]
    if errors:
        lines += ["Failures:", ""] + errors
    write_text(os.path.join(out, f"{name}.md"), lines)
    header = ["variant", "complexity", "length", "forward_flops", "forward_matmul_flops",
              "forward_temp_bytes", "forward_has_loop"]
    if s["grad"]:
        header += ["train_flops", "train_matmul_flops", "train_temp_bytes", "train_has_loop"]
    header += ["error"]
    rows = []
    for r in result["rows"]:
        for n in lengths:
            c = r["cells"][n]
            row = [r["variant"], r["complexity"], n]
            for part in ["forward"] + (["train"] if s["grad"] else []):
                d = c.get(part, {})
                row += [d.get("flops"), d.get("matmul_flops"), d.get("temp_bytes"),
                        d.get("has_loop")]
            rows.append(row + [c.get("error")])
    write_csv(os.path.join(out, f"{name}.csv"), header, rows)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="all")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--task", default="text", help="whose per-variant hyperparameters to use")
    p.add_argument("--grad", action="store_true", help="also forward + backward")
    p.add_argument("--out", default="results")
    p.add_argument("--name", default=None, help="file stem (default cost_<backend>)")
    a = p.parse_args(argv)

    import attention
    from tools.sweep import parse_list
    variants = parse_list(a.variants, attention.names(), "variants")
    lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    if len(lengths) < 2 or any(n < 2 for n in lengths):
        raise ValueError(f"--lengths: at least two integers >= 2 needed; got {a.lengths!r}")
    env = machine_info()
    rows = run(variants, lengths, batch=a.batch, heads=a.heads, head_dim=a.head_dim,
               task=a.task, grad=a.grad)
    result = {"environment": env, "rows": rows,
              "settings": {"lengths": lengths, "batch": a.batch, "heads": a.heads,
                           "head_dim": a.head_dim, "task": a.task, "grad": a.grad}}
    name = a.name or f"cost_{env['backend']}"
    write_tables(result, a.out, name)
    print(f"-> {os.path.join(a.out, name)}.md")


if __name__ == "__main__":
    main()
