"""Training speed and peak memory per attention variant and length: LRA Table 2 layout.

    python -m tools.bench_speed --out results/ --model small --batch 4      # CPU-sized
    python -m tools.bench_speed --out results/ --model lra                 # LRA: text, batch 32
    python -m tools.bench_speed --variants dense,local --lengths 1024,2048,4096,8192

For every registered variant (or --variants) and every length, one full training step
(forward, backward, AdamW update: the jitted step of training/loop.py) of the byte-level text
classifier on a synthetic batch (random bytes, no padding) is compiled and timed: steps/s is
the median over --repeats timed groups of steps, each group ended by block_until_ready.
Memory: the compiled step's buffers (XLA memory_analysis: arguments + outputs + temporaries -
donated aliases), deterministic on any backend; where the device reports memory_stats (GPU/TPU)
also the device's peak bytes in use, measured with each cell in its own subprocess (--isolate).
Ratios are against dense measured in the same invocation: all variants of a length are
compiled and warmed up, then timed round-robin (one group of each in turn, --repeats rounds),
so load changes on a shared machine hit every variant of a length alike. Grid variants (hyperparameter `shape`)
see the sequence as a near-square grid (rows x cols = length), noted in the table.
Writes OUT/<name>.md (+ .csv, .json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

from tools.bench_attention import near_square
from tools.compiled import memory, xla_flops
from tools.common import (REPO_ROOT, header_lines, machine_info, markdown_table,
                          shared_machine_note, write_csv, write_text)

# LRA Table 2's model: the text task's base config (4 layers, 4 heads, emb/qkv 256, MLP 1024,
# batch 32; the LRA paper, Tay et al. 2020, arXiv 2011.04006). Used when configs/text.py is absent, else that file wins.
LRA_TEXT_MODEL = {"num_layers": 4, "num_heads": 4, "emb_dim": 256, "qkv_dim": 256,
                  "mlp_dim": 1024}
LRA_TEXT_BATCH = 32
# A CPU-sized model: same shape of network, narrower and shallower.
SMALL_MODEL = {"num_layers": 2, "num_heads": 4, "emb_dim": 128, "qkv_dim": 128, "mlp_dim": 256}
MODELS = {"lra": LRA_TEXT_MODEL, "small": SMALL_MODEL}
VOCAB = 256        # bytes
NUM_CLASSES = 2


def bench_config(variant: str, model: str = "lra", overrides: dict | None = None):
    """The text task's config for `variant` (configs/text.py if present) with model sizes."""
    import ml_collections

    try:
        mod = importlib.import_module("configs.text")
        c = mod.get_config(variant)
        source = "configs/text.py"
    except ModuleNotFoundError:
        from configs import common
        c = common.base_config("text", variant)
        for k, v in LRA_TEXT_MODEL.items():
            c.model[k] = v
        c.data.batch_size = LRA_TEXT_BATCH
        source = "LRA text base config (configs/text.py absent)"
    c = ml_collections.ConfigDict(c.to_dict())  # unlocked copy
    if model != "lra" or source != "configs/text.py":
        for k, v in MODELS[model].items():
            c.model[k] = v
    for k, v in (overrides or {}).items():
        c.model[k] = v
    # Attention-weight dropout off for every variant: not all variants have it, and the table
    # compares the attention mechanisms at equal work (residual dropout stays as configured).
    c.model.attention_dropout_rate = 0.0
    return c, source


def over_cap(cell: dict, max_memory_gb: float | None) -> str | None:
    """Why the cell is skipped (its compiled buffers exceed the cap), or None."""
    need = cell.get("compiled_bytes", 0)
    if max_memory_gb and need > max_memory_gb * 2**30:
        return f"needs {need / 2**30:.3g} GB > --max-memory-gb {max_memory_gb}"
    return None


class Cell:
    """One (variant, length): the compiled training step, its state and batch, and `info`
    (sizes, memory, FLOPs; after timing also steps/s). Build it, then warm_up(), then time()."""

    def __init__(self, variant: str, length: int, *, batch: int, model: str = "lra",
                 model_overrides: dict | None = None, max_memory_gb: float | None = None,
                 seed: int = 0):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from models import build_model, count_params
        from training import optim
        from training.loop import make_train_step

        config, source = bench_config(variant, model, model_overrides)
        grid = near_square(length) if "shape" in _defaults(variant) else None
        model_obj = build_model(config, num_classes=NUM_CLASSES, vocab_size=VOCAB,
                                max_len=length, grid_shape=grid, seed=seed)
        opt = nnx.Optimizer(model_obj, optim.optimizer(config.train), wrt=nnx.Param)
        graphdef, self.state = nnx.split((model_obj, opt))
        rng = np.random.default_rng(seed)
        self.batch = {
            "inputs": jnp.asarray(rng.integers(0, VOCAB, (batch, length)), jnp.int32),  # [B, T]
            "mask": jnp.ones((batch, length), bool),                                    # [B, T]
            "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (batch,)), jnp.int32)}    # [B]
        self.info = {"variant": variant, "length": length, "batch": batch, "grid": grid,
                     "num_params": count_params(model_obj), "config_source": source,
                     "model": {k: config.model[k] for k in ("num_layers", "num_heads",
                                                            "emb_dim", "qkv_dim", "mlp_dim")}}
        step_fn = jax.jit(make_train_step(graphdef, config.seed), donate_argnums=0)
        t0 = time.perf_counter()
        self.compiled = step_fn.lower(self.state, self.batch,
                                      jnp.asarray(0, jnp.int32)).compile()
        self.info["compile_seconds"] = round(time.perf_counter() - t0, 2)
        self.info.update(memory(self.compiled))
        self.info["step_flops"] = xla_flops(self.compiled)
        skip = over_cap(self.info, max_memory_gb)
        if skip:
            self.info["skipped"] = skip
        self.step, self.steps_per_group, self.times = 0, 1, []

    @property
    def runnable(self) -> bool:
        return "skipped" not in self.info

    def run(self, n: int):
        import jax
        import jax.numpy as jnp

        for _ in range(n):
            self.state, metrics = self.compiled(self.state, self.batch,
                                                jnp.asarray(self.step, jnp.int32))
            self.step += 1
        jax.block_until_ready((self.state, metrics))
        return metrics

    def warm_up(self, target_seconds: float, max_steps: int = 50) -> None:
        """One first execution; sets how many steps a timed group of ~target_seconds has."""
        t0 = time.perf_counter()
        metrics = self.run(1)
        first = time.perf_counter() - t0
        if not bool(metrics["finite"]):
            raise FloatingPointError(f"{self.info['variant']} at length {self.info['length']}: "
                                     f"non-finite loss in the benchmark step")
        self.steps_per_group = int(min(max_steps, max(1, math.ceil(
            target_seconds / max(first, 1e-6)))))

    def time_group(self) -> None:
        t0 = time.perf_counter()
        self.run(self.steps_per_group)
        self.times.append((time.perf_counter() - t0) / self.steps_per_group)

    def result(self) -> dict:
        import jax

        out = dict(self.info)
        if self.times:
            out["steps_timed"] = self.steps_per_group * len(self.times)
            out["seconds_per_step"] = statistics.median(self.times)
            out["steps_per_sec"] = 1.0 / out["seconds_per_step"]
            out["steps_per_sec_spread"] = [round(1.0 / max(self.times), 4),
                                           round(1.0 / min(self.times), 4)]
            stats = jax.devices()[0].memory_stats()
            if stats and "peak_bytes_in_use" in stats:
                out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
        return out


def measure_cell(variant: str, length: int, *, batch: int, model: str = "lra",
                 model_overrides: dict | None = None, repeats: int = 3,
                 target_seconds: float = 2.0, max_steps: int = 50,
                 max_memory_gb: float | None = None, seed: int = 0) -> dict:
    """Compiles and times one training step of `variant` at `length`. -> result dict."""
    cell = Cell(variant, length, batch=batch, model=model, model_overrides=model_overrides,
                max_memory_gb=max_memory_gb, seed=seed)
    if cell.runnable:
        cell.warm_up(target_seconds, max_steps)
        for _ in range(repeats):
            cell.time_group()
    return cell.result()


def _error(variant, length, batch, e) -> dict:
    return {"variant": variant, "length": length, "batch": batch,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def measure_length_round_robin(variants, length: int, *, batch: int, repeats: int = 3,
                               target_seconds: float = 2.0, echo=print, **cell_kwargs) -> list:
    """All variants at one length: compile all, warm each up, then `repeats` rounds that time
    one group of every variant in turn, so load changes on a shared machine hit all alike."""
    cells, results = {}, {}
    for v in variants:
        try:
            cells[v] = Cell(v, length, batch=batch, **cell_kwargs)
            if cells[v].runnable:
                cells[v].warm_up(target_seconds)
        except Exception as e:  # noqa: BLE001  (one variant's failure is a table entry)
            cells.pop(v, None)
            results[v] = _error(v, length, batch, e)
    for _ in range(repeats):
        for v in variants:
            if v in cells and cells[v].runnable:
                try:
                    cells[v].time_group()
                except Exception as e:  # noqa: BLE001
                    results[v] = _error(v, length, batch, e)
                    del cells[v]
    for v, c in cells.items():
        results[v] = c.result()
    del cells
    return [results[v] for v in variants]


def _defaults(variant):
    import attention
    return attention.get(variant).defaults


def _cell_subprocess(kwargs: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "tools.bench_speed", "--cell", json.dumps(kwargs)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("CELL "):
            return json.loads(line[5:])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    raise RuntimeError(f"cell subprocess failed (exit {proc.returncode}): {tail}")


def run_benchmark(variants, lengths, *, batch, model="lra", model_overrides=None, repeats=3,
                  target_seconds=2.0, max_memory_gb=None, isolate=False, cell_timeout=None,
                  echo=print) -> list[dict]:
    """Every (length, variant) cell; failures are recorded as {"error": ...}. In-process:
    round-robin over the variants of each length; isolated: one subprocess per cell."""
    import jax

    cells = []
    for length in lengths:
        if isolate:
            row = []
            for v in variants:
                kwargs = dict(variant=v, length=length, batch=batch, model=model,
                              model_overrides=model_overrides, repeats=repeats,
                              target_seconds=target_seconds, max_memory_gb=max_memory_gb)
                try:
                    row.append(_cell_subprocess(kwargs, cell_timeout))
                except Exception as e:  # noqa: BLE001
                    row.append(_error(v, length, batch, e))
        else:
            row = measure_length_round_robin(
                variants, length, batch=batch, repeats=repeats, target_seconds=target_seconds,
                model=model, model_overrides=model_overrides, max_memory_gb=max_memory_gb)
            for cell in row:
                if "device_peak_bytes" in cell:
                    # Process-wide peak so far, not this cell's: kept apart, not tabled.
                    cell["device_peak_bytes_process"] = cell.pop("device_peak_bytes")
        for cell in row:
            if "steps_per_sec" in cell:
                echo(f"L={length} {cell['variant']}: {cell['steps_per_sec']:.3f} steps/s, "
                     f"{cell.get('compiled_bytes', 0) / 2**30:.3f} GB compiled")
            else:
                echo(f"L={length} {cell['variant']}: {cell.get('skipped') or cell.get('error')}")
        cells.extend(row)
        jax.clear_caches()
    return cells


def _gb(x):
    return None if x is None else x / 2**30


def table(cells: list[dict], lengths, variants) -> dict:
    """Rows in LRA Table 2 layout with ratios against dense of the same run."""
    by = {(c["variant"], c["length"]): c for c in cells}
    dense = {L: by.get(("dense", L), {}) for L in lengths}
    rows = []
    for v in variants:
        row = {"variant": v, "speed": {}, "memory": {}}
        for L in lengths:
            c = by.get((v, L), {})
            sps = c.get("steps_per_sec")
            d = dense[L].get("steps_per_sec")
            mem = c.get("device_peak_bytes") or c.get("compiled_bytes")
            dmem = dense[L].get("device_peak_bytes") or dense[L].get("compiled_bytes")
            row["speed"][L] = {"steps_per_sec": sps,
                               "vs_dense": sps / d if sps and d else None,
                               "note": c.get("error") or c.get("skipped")}
            row["memory"][L] = {"gb": _gb(mem), "vs_dense": mem / dmem if mem and dmem else None,
                                "compiled_gb": _gb(c.get("compiled_bytes")),
                                "device_peak_gb": _gb(c.get("device_peak_bytes"))}
        rows.append(row)
    return {"lengths": list(lengths), "rows": rows}


def _klabel(L):
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def write_tables(result: dict, out: str, name: str) -> None:
    tab = result["table"]
    lengths = tab["lengths"]
    env = result["environment"]
    s = result["settings"]
    lines = header_lines("Training speed and memory (LRA Table 2 layout)", env)
    mem_kind = ("device peak bytes in use (memory_stats)" if result["device_memory"]
                else "compiled buffers of the step: arguments + outputs + temporaries - "
                     "donated aliases (XLA memory_analysis)")
    lines += [
        f"Steps per second of one full training step (forward, backward, AdamW update) of the "
        f"text classifier ({s['model_desc']}), batch {s['batch']}, synthetic byte sequences "
        f"without padding, attention-weight dropout off for all variants; median of "
        f"{s['repeats']} timed groups after a warm-up step, the groups taken round-robin over "
        f"the variants of a length. Speed "
        f"columns: steps/s, and in parentheses the speed relative to dense measured in this "
        f"same run. Memory columns: GB, {mem_kind}; in parentheses relative to dense. "
        f"Config: {s['config_source']}. Cells: `fail` = error (listed below), `skip` = over "
        f"the memory cap.", ""]
    header = (["Model"] + [f"Steps/s {_klabel(L)}" for L in lengths]
              + [f"Mem GB {_klabel(L)}" for L in lengths] + ["Params"])
    rows, notes = [], []
    params = {}
    for c in result["cells"]:
        if c.get("num_params") is not None:
            params.setdefault(c["variant"], set()).add(c["num_params"])
    for r in tab["rows"]:
        row = [r["variant"]]
        for L in lengths:
            sp = r["speed"][L]
            if sp["steps_per_sec"] is None:
                row.append("skip" if sp["note"] and "memory-gb" in sp["note"] else "fail")
                if sp["note"]:
                    notes.append(f"- {r['variant']} at {L}: {sp['note']}")
            elif r["variant"] == "dense":
                row.append(f"{sp['steps_per_sec']:.3g}")
            else:
                ratio = f" ({sp['vs_dense']:.2f}x)" if sp["vs_dense"] else ""
                row.append(f"{sp['steps_per_sec']:.3g}{ratio}")
        for L in lengths:
            m = r["memory"][L]
            if m["gb"] is None:
                row.append("-")
            else:
                ratio = (f" ({m['vs_dense']:.2f}x)" if m["vs_dense"] and r["variant"] != "dense"
                         else "")
                row.append(f"{m['gb']:.3f}{ratio}")
        p = sorted(params.get(r["variant"], []))
        row.append(f"{p[0]:,}" if len(p) == 1 else
                   (f"{p[0]:,}-{p[-1]:,}" if p else "-"))
        rows.append(row)
    lines += markdown_table(header, rows)
    grids = sorted({(c["variant"], tuple(c["grid"])) for c in result["cells"] if c.get("grid")})
    if grids:
        lines += ["", "Grid variants ran on the sequence folded into a near-square grid: "
                  + "; ".join(f"{v} {g[0]}x{g[1]}" for v, g in grids) + "."]
    if notes:
        lines += ["", "Failures and skips:", ""] + notes
    lines += ["", "Params: trainable parameters of the benchmarked model (a range when they "
              "depend on the length, e.g. length-sized projections)."]
    write_text(os.path.join(out, f"{name}.md"), lines)
    csv_rows = []
    for c in result["cells"]:
        d = next((x for x in result["cells"] if x["variant"] == "dense"
                  and x["length"] == c["length"]), {})
        ratio = (c["steps_per_sec"] / d["steps_per_sec"]
                 if c.get("steps_per_sec") and d.get("steps_per_sec") else None)
        csv_rows.append([c["variant"], c["length"], c["batch"], c.get("steps_per_sec"), ratio,
                         c.get("compiled_bytes"), c.get("temp_bytes"),
                         c.get("device_peak_bytes"), c.get("step_flops"), c.get("num_params"),
                         c.get("compile_seconds"), c.get("steps_timed"),
                         c.get("error") or c.get("skipped")])
    write_csv(os.path.join(out, f"{name}.csv"),
              ["variant", "length", "batch", "steps_per_sec", "speed_vs_dense",
               "compiled_bytes", "temp_bytes", "device_peak_bytes", "step_flops", "num_params",
               "compile_seconds", "steps_timed", "note"], csv_rows)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="all", help="comma-separated names or 'all'")
    p.add_argument("--lengths", default="1024,2048,3072,4096")
    p.add_argument("--model", default="lra", choices=sorted(MODELS),
                   help="lra: the text config at LRA's sizes; small: a CPU-sized model")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--emb", type=int, default=None, help="emb_dim = qkv_dim")
    p.add_argument("--mlp", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help=f"default {LRA_TEXT_BATCH} (lra), "
                   "4 (small)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target-seconds", type=float, default=2.0,
                   help="approximate length of one timed group")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="skip a cell whose compiled buffers exceed this")
    p.add_argument("--isolate", default="auto", choices=("auto", "yes", "no"),
                   help="one subprocess per cell (auto: where the device reports memory_stats)")
    p.add_argument("--cell-timeout", type=float, default=None)
    p.add_argument("--note", default="", help="written in the header")
    p.add_argument("--quiet-load", type=float, default=1.0,
                   help="above this 1-minute load average the header says the machine was shared")
    p.add_argument("--out", default="results")
    p.add_argument("--name", default=None, help="file stem (default speed_<backend>)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.cell is not None:  # one cell in this process, for --isolate
        print("CELL " + json.dumps(measure_cell(**json.loads(a.cell)), default=str))
        return

    import jax

    import attention
    from tools.sweep import parse_list
    variants = parse_list(a.variants, attention.names(), "variants")
    variants = (["dense"] if "dense" in variants else []) + [v for v in variants if v != "dense"]
    lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    if any(L < 2 for L in lengths):
        raise ValueError(f"--lengths must be integers >= 2; got {a.lengths!r}")
    batch = a.batch or (LRA_TEXT_BATCH if a.model == "lra" else 4)
    overrides = {k: v for k, v in (("num_layers", a.layers), ("num_heads", a.heads),
                                   ("emb_dim", a.emb), ("qkv_dim", a.emb),
                                   ("mlp_dim", a.mlp)) if v is not None}
    stats = jax.devices()[0].memory_stats()
    device_memory = bool(stats and "peak_bytes_in_use" in stats)
    isolate = a.isolate == "yes" or (a.isolate == "auto" and device_memory)
    env = machine_info(note="; ".join(x for x in (a.note, shared_machine_note(a.quiet_load))
                                      if x))
    cfg, source = bench_config("dense", a.model, overrides)
    model_desc = ", ".join(f"{k} {cfg.model[k]}" for k in ("num_layers", "num_heads",
                                                            "emb_dim", "qkv_dim", "mlp_dim"))
    t0 = time.time()
    cells = run_benchmark(variants, lengths, batch=batch, model=a.model,
                          model_overrides=overrides, repeats=a.repeats,
                          target_seconds=a.target_seconds, max_memory_gb=a.max_memory_gb,
                          isolate=isolate, cell_timeout=a.cell_timeout)
    try:
        env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    result = {"environment": env, "device_memory": device_memory and isolate,
              "settings": {"batch": batch, "model": a.model, "model_desc": model_desc,
                           "overrides": overrides, "repeats": a.repeats,
                           "target_seconds": a.target_seconds, "config_source": source,
                           "isolate": isolate, "seconds": round(time.time() - t0, 1)},
              "cells": cells, "table": table(cells, lengths, variants)}
    name = a.name or f"speed_{env['backend']}"
    write_tables(result, a.out, name)
    print(f"-> {os.path.join(a.out, name)}.md")


if __name__ == "__main__":
    main()
