"""Accuracy and parameter tables from a sweep root, in the layout of LRA Table 1.

    python -m tools.report --root runs/sweep --out results/ [--no-published] [--name accuracy]

Reads ROOT/<task>/<variant>/{results.json, status.json, error.txt} (written by train.py and
tools.sweep) and writes, under OUT:
  <name>.md    Table 1 layout (rows: variants; columns: ListOps, Text, Retrieval, Image, Path,
               Path-X, Avg) with the LRA paper's numbers beside ours, the parameter counts per
               variant per task, and one line per run (steps, best validation, majority class,
               wall time, the error of a failed run);
  <name>.csv   the accuracy table; <name>_params.csv the parameter counts; <name>_runs.csv per
               run; <name>.json everything above (tools.plots reads it).
Accuracy is test accuracy in %. Avg is the mean over the five averaged LRA tasks (Path-X apart)
that a variant finished; when fewer than five, the count is written beside it.

--root takes several roots (comma-separated), and a variant directory may hold seed_<n>/ runs
(tools.sweep --seeds): runs of the same row and task are averaged, the cell reads
"mean ± std [n]" (population std over the n runs). A run fine-tuned from a pretraining run
(train.init_from) is its own row, `<variant>+<pretraining objective>` (e.g. `dense+denoise`),
so from-scratch and self-pretrained runs sit side by side.
Language modelling runs (task `lm`) are not in Table 1: they get the LM table, <name>_lm.csv
and a section of <name>.md: test bits per byte (mean ± std over seeds) and training steps/s
(median of the logged rates of the run, averaged over seeds) per variant and context length.
"""

from __future__ import annotations

import argparse
import json
import os

import statistics

from tools import lra_published
from tools.common import (REPO_ROOT, LRA_AVERAGED, header_lines, machine_info, markdown_table,
                          task_order, write_csv, write_text)

LM_TASKS = ("lm",)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _run_dirs(vdir: str) -> list[tuple[str, int | None]]:
    """(workdir, seed) of one ROOT/<task>/<variant>/: itself, or its seed_<n>/ runs."""
    seeds = sorted((int(n[5:]), os.path.join(vdir, n)) for n in os.listdir(vdir)
                   if n.startswith("seed_") and n[5:].isdigit()
                   and os.path.isdir(os.path.join(vdir, n)))
    if seeds and not any(os.path.exists(os.path.join(vdir, f))
                         for f in ("results.json", "config.json")):
        return [(d, s) for s, d in seeds]
    return [(vdir, None)]


def _median_steps_per_sec(wdir: str) -> float | None:
    """Median of the logged training rates (the first log row, which holds the compile, out)."""
    rates = []
    try:
        with open(os.path.join(wdir, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                if row.get("split") == "train" and row.get("steps_per_sec") is not None:
                    rates.append(row["steps_per_sec"])
    except (OSError, ValueError):
        return None
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else None


def collect(root: str) -> list[dict]:
    """One record per run under ROOT (several roots: comma-separated): ROOT/<task>/<variant>/
    or its seed_<n>/ runs: status, accuracy, params, error, and for fine-tuned runs the
    pretraining they started from."""
    if "," in root:
        return [r for part in root.split(",") if part.strip() for r in collect(part.strip())]
    records = []
    if not os.path.isdir(root):
        raise ValueError(f"report: sweep root {root!r} is not a directory")
    for task in sorted(os.listdir(root)):
        tdir = os.path.join(root, task)
        if not os.path.isdir(tdir):
            continue
        for variant in sorted(os.listdir(tdir)):
            vdir = os.path.join(tdir, variant)
            if not os.path.isdir(vdir):
                continue
            for wdir, seed in _run_dirs(vdir):
                rec = _record(task, variant, wdir, seed)
                if rec is not None:
                    records.append(rec)
    return records


def _record(task: str, variant: str, wdir: str, seed) -> dict | None:
    """One run directory -> its record (None: nothing there yet)."""
    results = _load(os.path.join(wdir, "results.json"))
    status = _load(os.path.join(wdir, "status.json")) or {}
    rec = {"task": task, "variant": variant, "workdir": wdir, "label": variant}
    if seed is not None:
        rec["seed"] = seed
    pre_dir = _pretrain_dir(wdir, results, status)
    if pre_dir:
        pre_cfg = _load(os.path.join(pre_dir, "config.json")) or {}
        rec["pretrain_objective"] = (pre_cfg.get("train") or {}).get("objective", "pretrained")
        rec["pretrain_workdir"] = pre_dir
        rec["label"] = f"{variant}+{rec['pretrain_objective']}"
    if results is not None:
        train_cfg = (results.get("config") or {}).get("train", {})
        rec.update(
            status="finished", test_accuracy=results["test_accuracy"],
            best_val_accuracy=results.get("best_val_accuracy"),
            num_params=results.get("num_params"), steps=results.get("steps"),
            wall_time_sec=results.get("wall_time_sec"),
            test_majority_rate=results.get("test_majority_rate"),
            environment=results.get("environment"),
            objective=train_cfg.get("objective", "classify"),
            max_len=((results.get("config") or {}).get("data") or {}).get("max_len"),
            test_bits_per_byte=results.get("test_bits_per_byte"),
            validation_bits_per_byte=results.get("validation_bits_per_byte"),
            test_unigram_bits_per_byte=(results.get("task_info") or {}).get(
                "test_unigram_bits_per_byte"),
            steps_per_sec=_median_steps_per_sec(wdir))
    elif status.get("status") == "failed":
        err = ""
        try:
            with open(os.path.join(wdir, "error.txt")) as f:
                err = f.read().strip()
        except OSError:
            pass
        rec.update(status="failed", error=status.get("error") or
                   (err.splitlines()[-1] if err else "failed"), error_text=err)
    elif os.path.exists(os.path.join(wdir, "config.json")) or status:
        rec["status"] = "unfinished"
    else:
        return None
    return rec


def _pretrain_dir(wdir: str, results, status: dict) -> str:
    """The workdir a run was (or was to be) fine-tuned from; "" for a run from scratch."""
    config = (results or {}).get("config") or _load(os.path.join(wdir, "config.json")) or {}
    return ((config.get("train") or {}).get("init_from") or status.get("pretrain") or "")


def lm_table(records: list[dict]) -> dict:
    """-> {"rows": [...], "lengths": [...], "cells": {row: {length: cell}}} for task lm."""
    records = [r for r in records if r["task"] in LM_TASKS]
    rows = variant_order(_label(r) for r in records)
    lengths = sorted({r.get("max_len") for r in records if r.get("max_len") is not None})
    cells = {}
    for v in rows:
        cells[v] = {}
        for n in lengths:
            runs = [r for r in records if _label(r) == v and r.get("max_len") == n]
            done = [r for r in runs if r["status"] == "finished"
                    and r.get("test_bits_per_byte") is not None]
            if not done:
                cells[v][n] = {"status": runs[0]["status"] if runs else "not run"}
                continue
            bpb, std = _mean_std([r["test_bits_per_byte"] for r in done])
            rates = [r["steps_per_sec"] for r in done if r.get("steps_per_sec")]
            val = [r["validation_bits_per_byte"] for r in done
                   if r.get("validation_bits_per_byte") is not None]
            cells[v][n] = {"status": "finished", "test_bits_per_byte": round(bpb, 4),
                           "std": round(std, 4), "n": len(done),
                           "validation_bits_per_byte": round(sum(val) / len(val), 4)
                           if val else None,
                           "steps_per_sec": round(sum(rates) / len(rates), 3) if rates else None,
                           "steps": done[0].get("steps")}
    # A failed run that has no length recorded (it never started) is listed in the runs table.
    return {"rows": rows, "lengths": lengths, "cells": cells}


def _fmt_lm(cell: dict) -> list:
    if cell["status"] != "finished":
        return [{"not run": "-", "failed": "fail"}.get(cell["status"], cell["status"]), ""]
    bpb = f"{cell['test_bits_per_byte']:.3f}"
    if cell["n"] > 1:
        bpb += f" ± {cell['std']:.3f} [{cell['n']}]"
    rate = cell.get("steps_per_sec")
    return [bpb, "-" if rate is None else f"{rate:.3g}"]


def variant_order(variants) -> list[str]:
    variants = sorted(set(variants))
    return (["dense"] if "dense" in variants else []) + [v for v in variants if v != "dense"]


def _pct(x):
    return None if x is None else round(100.0 * x, 2)


def _label(r: dict) -> str:
    return r.get("label", r["variant"])


def _mean_std(values):
    m = sum(values) / len(values)
    return m, (statistics.pstdev(values) if len(values) > 1 else 0.0)


def accuracy_table(records: list[dict], published: bool = True) -> dict:
    """-> {"tasks", "variants", "cells": {row: {task: cell}}, "avg": {row: ...}}. Rows are
    variants (`<variant>+<objective>` for fine-tuned runs); several runs of a row and task
    (seeds) are averaged: cell accuracy = mean, std, n."""
    records = [r for r in records if r["task"] not in LM_TASKS]
    tasks = task_order(r["task"] for r in records)
    variants = variant_order(_label(r) for r in records)
    base = {_label(r): r["variant"] for r in records}
    by: dict = {}
    for r in records:
        by.setdefault((r["task"], _label(r)), []).append(r)
    cells, avg = {}, {}
    for v in variants:
        cells[v] = {}
        finished = []
        for t in tasks:
            runs = by.get((t, v), [])
            done = [r["test_accuracy"] for r in runs if r["status"] == "finished"]
            if not runs:
                cell = {"status": "not run"}
            elif done:
                mean, std = _mean_std(done)
                cell = {"status": "finished", "accuracy": _pct(mean)}
                if len(runs) > 1:
                    cell.update(std=_pct(std), n=len(done), runs=len(runs))
                if t in LRA_AVERAGED:
                    finished.append(mean)
            else:
                r = runs[0]
                cell = {"status": r["status"], "error": r.get("error")}
            if published:
                model = lra_published.lra_model_for(base[v])
                if model is not None and t == "pathx":
                    cell["published"] = lra_published.PATHX_PUBLISHED
                elif model is not None:
                    cell["published"] = lra_published.TABLE1[model].get(t)
            cells[v][t] = cell
        avg[v] = {"accuracy": _pct(sum(finished) / len(finished)) if finished else None,
                  "tasks": len(finished)}
        model = lra_published.lra_model_for(base[v])
        if published and model is not None:
            avg[v]["published"] = lra_published.TABLE1[model]["avg"]
            avg[v]["lra_model"] = model
    return {"tasks": tasks, "variants": variants, "cells": cells, "avg": avg}


def _fmt_cell(cell: dict) -> str:
    s = cell["status"]
    text = f"{cell['accuracy']:.2f}" if s == "finished" else {"not run": "-", "failed": "fail",
                                                               "unfinished": "unfinished"}.get(s, s)
    if s == "finished" and "n" in cell:
        text += f" ± {cell['std']:.2f} [{cell['n']}" + (
            f" of {cell['runs']}]" if cell["runs"] != cell["n"] else "]")
    if "published" in cell and cell["published"] is not None:
        pub = cell["published"]
        text += f" ({pub:.2f})" if isinstance(pub, float) else f" ({pub})"
    return text


def _fmt_avg(a: dict) -> str:
    if a["accuracy"] is None:
        text = "-"
    else:
        text = f"{a['accuracy']:.2f}"
        if a["tasks"] < len(LRA_AVERAGED):
            text += f" [{a['tasks']}/{len(LRA_AVERAGED)}]"
    if a.get("published") is not None:
        text += f" ({a['published']:.2f})"
    return text


def params_table(records: list[dict]) -> dict:
    tasks = task_order(r["task"] for r in records)
    variants = variant_order(_label(r) for r in records)
    by = {}
    for r in records:
        if r.get("num_params") is not None or (r["task"], _label(r)) not in by:
            by[(r["task"], _label(r))] = r.get("num_params")
    return {"tasks": tasks, "variants": variants,
            "params": {v: {t: by.get((t, v)) for t in tasks} for v in variants}}


def _col(task):
    return lra_published.TASK_COLUMNS.get(task, task)


def build(root: str, out: str, name: str = "accuracy", published: bool = True,
          title: str | None = None) -> dict:
    """Writes the tables under `out`; returns the JSON-able report."""
    records = collect(root)
    acc = accuracy_table(records, published)
    lm = lm_table(records)
    par = params_table(records)
    env = machine_info()
    tasks = acc["tasks"]
    all_tasks = task_order(r["task"] for r in records)

    header = ["Model"] + [_col(t) for t in tasks] + ["Avg"]
    rows = [[v] + [_fmt_cell(acc["cells"][v][t]) for t in tasks] + [_fmt_avg(acc["avg"][v])]
            for v in acc["variants"]]
    lines = header_lines(title or "Accuracy (LRA Table 1 layout)", env)
    lines += [] if not tasks else [f"Test accuracy (%) of the runs under `{root}`"
              + (f"; in parentheses the LRA paper's number for the corresponding model "
                 f"({lra_published.SOURCE})" if published else "") + ". `-`: not run; `fail`: "
              "the run failed (error below). Avg: mean over ListOps, Text, Retrieval, Image, "
              "Path where finished ([k/5] when fewer). Runs trained with the settings listed "
              "per run below are not comparable to the paper's unless those match.", ""]
    sweep_info = _load(os.path.join(root, "sweep.json"))
    if sweep_info:
        pre = sweep_info.get("pretrain")
        settings = (f"Sweep settings (last invocation, {sweep_info.get('date', '?')}): config "
                    f"option `{sweep_info.get('arg') or '(none)'}`, overrides "
                    f"`{' '.join(sweep_info.get('sets') or []) or '(none)'}`"
                    + (f", pretraining `{pre}` first" if pre else "") + ".")
        if tasks:
            lines = lines[:-1] + [settings, ""] + lines[-1:]
        else:
            lines += ["", settings, ""]
    if lm["rows"]:
        lines += ["## Language modelling (task lm): test bits per byte", "",
                  "Bits per byte of the test split (next-byte cross-entropy / ln 2; mean ± std "
                  "over seeds when several) and training steps/s (median of the logged rates "
                  "after the first) per variant and context length (bytes). The test split's "
                  "unigram entropy, the bits per byte of a model that ignores context, is in "
                  "the runs' task_info (test_unigram_bits_per_byte).", ""]
        lm_header = ["Model"] + [h for n in lm["lengths"] for h in (f"bpb {n}", f"steps/s {n}")]
        lines += markdown_table(lm_header, [[v] + [x for n in lm["lengths"]
                                                   for x in _fmt_lm(lm["cells"][v][n])]
                                            for v in lm["rows"]])
        unigram = sorted({round(r["test_unigram_bits_per_byte"], 3) for r in records
                          if r.get("test_unigram_bits_per_byte") is not None
                          and r["task"] in LM_TASKS})
        if unigram:
            lines += ["", "Unigram entropy of the test split read by these runs (bits per byte): "
                      + ", ".join(f"{u:.3f}" for u in unigram) + "."]
        lines += [""]
    if tasks:
        lines += markdown_table(header, rows)
    if published:
        matched = {v: acc["avg"][v].get("lra_model") for v in acc["variants"]}
        names = ", ".join(f"{v} = {m}" for v, m in matched.items() if m)
        if names:
            lines += ["", f"LRA model matched to each variant: {names}"
                      + ("" if names.endswith(".") else ".")]

    lines += ["", "## Parameters per variant per task", ""]
    p_rows = [[v] + [(f"{par['params'][v][t]:,}" if par["params"][v][t] is not None else "-")
                     for t in par["tasks"]] for v in par["variants"]]
    lines += markdown_table(["Model"] + [_col(t) for t in par["tasks"]], p_rows)

    lines += ["", "## Runs", ""]
    run_header = ["Task", "Variant", "Status", "Steps", "Test acc %", "Best val %",
                  "Majority %", "Params", "Wall s", "Seed", "Test bpb", "Error"]
    run_rows = []
    for r in sorted(records, key=lambda r: (all_tasks.index(r["task"]), _label(r),
                                            r.get("seed") or 0)):
        bpb = r.get("test_bits_per_byte")
        run_rows.append([
            r["task"], _label(r), r["status"], r.get("steps"), _pct(r.get("test_accuracy")),
            _pct(r.get("best_val_accuracy")), _pct(r.get("test_majority_rate")),
            r.get("num_params"),
            None if r.get("wall_time_sec") is None else round(r["wall_time_sec"], 1),
            r.get("seed"), None if bpb is None else round(bpb, 4),
            (r.get("error") or "").replace("|", "/")[:200]])
    lines += markdown_table(run_header, run_rows, ["l", "l", "l"] + ["r"] * 8 + ["l"])
    envs = {json.dumps(r["environment"], sort_keys=True) for r in records if r.get("environment")}
    if envs:
        lines += ["", "Environments the runs recorded (results.json):", ""]
        lines += [f"- {e}" for e in sorted(envs)]

    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, f"{name}.md"), lines)
    csv_header = ["variant"] + [h for t in tasks for h in
                                ([t] + ([f"{t}_published"] if published else []))]
    csv_header += ["avg", "avg_tasks"] + (["avg_published"] if published else [])
    csv_rows = []
    for v in acc["variants"]:
        row = [v]
        for t in tasks:
            c = acc["cells"][v][t]
            row.append(c.get("accuracy") if c["status"] == "finished" else c["status"])
            if published:
                row.append(c.get("published"))
        row += [acc["avg"][v]["accuracy"], acc["avg"][v]["tasks"]]
        if published:
            row.append(acc["avg"][v].get("published"))
        csv_rows.append(row)
    write_csv(os.path.join(out, f"{name}.csv"), csv_header, csv_rows)
    write_csv(os.path.join(out, f"{name}_params.csv"), ["variant"] + par["tasks"],
              [[v] + [par["params"][v][t] for t in par["tasks"]] for v in par["variants"]])
    write_csv(os.path.join(out, f"{name}_runs.csv"),
              ["task", "variant", "row", "seed", "status", "steps", "test_accuracy",
               "best_val_accuracy", "test_majority_rate", "num_params", "wall_time_sec",
               "test_bits_per_byte", "steps_per_sec", "error"],
              [[r["task"], r["variant"], _label(r), r.get("seed"), r["status"], r.get("steps"),
                r.get("test_accuracy"), r.get("best_val_accuracy"), r.get("test_majority_rate"),
                r.get("num_params"), r.get("wall_time_sec"), r.get("test_bits_per_byte"),
                r.get("steps_per_sec"), r.get("error")] for r in records])
    if lm["rows"]:
        write_csv(os.path.join(out, f"{name}_lm.csv"),
                  ["variant", "max_len", "test_bits_per_byte", "std", "n",
                   "validation_bits_per_byte", "steps_per_sec", "steps"],
                  [[v, n] + [lm["cells"][v][n].get(k) for k in (
                      "test_bits_per_byte", "std", "n", "validation_bits_per_byte",
                      "steps_per_sec", "steps")]
                   for v in lm["rows"] for n in lm["lengths"]])
    report = {"root": root, "environment": env, "accuracy": acc, "params": par, "lm": lm,
              "runs": [{k: v for k, v in r.items() if k != "error_text"} for r in records],
              "published_source": lra_published.SOURCE if published else None}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


ARCHIVED = ("results.json", "metrics.jsonl", "status.json", "config.json", "error.txt",
            "sweep.json")


def archive_runs(root: str, dest: str) -> int:
    """Copies every run's logs under ROOT (results.json, metrics.jsonl, status.json,
    config.json, error.txt; seed_<n>/ and pretrain/ runs included; no checkpoints) to the same
    paths under DEST, so a committed table can be rebuilt from committed logs with
    `tools.report --root DEST`. Returns the number of files copied."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("checkpoints", "tensorboard")
                       and not d.startswith("checkpoints")]
        for name in filenames:
            if name in ARCHIVED:
                target = os.path.join(dest, os.path.relpath(dirpath, root))
                os.makedirs(target, exist_ok=True)
                with open(os.path.join(dirpath, name)) as f:
                    text = portable(f.read(), root, dest)
                with open(os.path.join(target, name), "w") as f:
                    f.write(text)
                n += 1
    return n


def portable(text: str, root: str, dest: str) -> str:
    """Run logs without this machine's paths: the interpreter becomes `python3`, the sweep
    root its archive folder and the repository root `.`, so a recorded command reads as one
    typed in the repository."""
    import re

    archive = os.path.relpath(os.path.abspath(dest), REPO_ROOT)
    text = re.sub(r'[^\s"]*/bin/python[0-9.]*(?=[\s"])', "python3", text)
    for path, short in ((os.path.abspath(root), archive), (REPO_ROOT + os.sep, "")):
        text = text.replace(path, short)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="sweep root (ROOT/<task>/<variant>/)")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--name", default="accuracy", help="file name stem of the outputs")
    p.add_argument("--no-published", action="store_true",
                   help="leave out the LRA paper's numbers")
    p.add_argument("--title", default=None)
    p.add_argument("--archive", default=None, metavar="DIR",
                   help="first copy the runs' logs (no checkpoints) to DIR and report from there")
    a = p.parse_args(argv)
    if a.archive:
        copied = sum(archive_runs(r.strip(), os.path.join(a.archive, os.path.basename(
            os.path.normpath(r.strip())))) for r in a.root.split(",") if r.strip())
        print(f"{copied} log files -> {a.archive}")
        a.root = ",".join(os.path.join(a.archive, os.path.basename(os.path.normpath(r.strip())))
                          for r in a.root.split(",") if r.strip())
    report = build(a.root, a.out, a.name, published=not a.no_published, title=a.title)
    print(f"{len(report['runs'])} runs -> {os.path.join(a.out, a.name)}.md")


if __name__ == "__main__":
    main()
