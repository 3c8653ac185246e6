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
"""

from __future__ import annotations

import argparse
import json
import os

from tools import lra_published
from tools.common import (LRA_AVERAGED, header_lines, machine_info, markdown_table, task_order,
                          write_csv, write_text)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(root: str) -> list[dict]:
    """One record per ROOT/<task>/<variant>/ directory: status, accuracy, params, error."""
    records = []
    if not os.path.isdir(root):
        raise ValueError(f"report: sweep root {root!r} is not a directory")
    for task in sorted(os.listdir(root)):
        tdir = os.path.join(root, task)
        if not os.path.isdir(tdir):
            continue
        for variant in sorted(os.listdir(tdir)):
            wdir = os.path.join(tdir, variant)
            if not os.path.isdir(wdir):
                continue
            results = _load(os.path.join(wdir, "results.json"))
            status = _load(os.path.join(wdir, "status.json")) or {}
            rec = {"task": task, "variant": variant, "workdir": wdir}
            if results is not None:
                rec.update(
                    status="finished", test_accuracy=results["test_accuracy"],
                    best_val_accuracy=results.get("best_val_accuracy"),
                    num_params=results.get("num_params"), steps=results.get("steps"),
                    wall_time_sec=results.get("wall_time_sec"),
                    test_majority_rate=results.get("test_majority_rate"),
                    environment=results.get("environment"))
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
                continue
            records.append(rec)
    return records


def variant_order(variants) -> list[str]:
    variants = sorted(set(variants))
    return (["dense"] if "dense" in variants else []) + [v for v in variants if v != "dense"]


def _pct(x):
    return None if x is None else round(100.0 * x, 2)


def accuracy_table(records: list[dict], published: bool = True) -> dict:
    """-> {"tasks", "variants", "cells": {variant: {task: cell}}, "avg": {variant: ...}}."""
    tasks = task_order(r["task"] for r in records)
    variants = variant_order(r["variant"] for r in records)
    by = {(r["task"], r["variant"]): r for r in records}
    cells, avg = {}, {}
    for v in variants:
        cells[v] = {}
        finished = []
        for t in tasks:
            r = by.get((t, v))
            if r is None:
                cell = {"status": "not run"}
            elif r["status"] == "finished":
                cell = {"status": "finished", "accuracy": _pct(r["test_accuracy"])}
                if t in LRA_AVERAGED:
                    finished.append(r["test_accuracy"])
            else:
                cell = {"status": r["status"], "error": r.get("error")}
            if published:
                model = lra_published.lra_model_for(v)
                if model is not None and t == "pathx":
                    cell["published"] = lra_published.PATHX_PUBLISHED
                elif model is not None:
                    cell["published"] = lra_published.TABLE1[model].get(t)
            cells[v][t] = cell
        avg[v] = {"accuracy": _pct(sum(finished) / len(finished)) if finished else None,
                  "tasks": len(finished)}
        model = lra_published.lra_model_for(v)
        if published and model is not None:
            avg[v]["published"] = lra_published.TABLE1[model]["avg"]
            avg[v]["lra_model"] = model
    return {"tasks": tasks, "variants": variants, "cells": cells, "avg": avg}


def _fmt_cell(cell: dict) -> str:
    s = cell["status"]
    text = f"{cell['accuracy']:.2f}" if s == "finished" else {"not run": "-", "failed": "fail",
                                                               "unfinished": "unfinished"}.get(s, s)
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
    variants = variant_order(r["variant"] for r in records)
    by = {(r["task"], r["variant"]): r.get("num_params") for r in records}
    return {"tasks": tasks, "variants": variants,
            "params": {v: {t: by.get((t, v)) for t in tasks} for v in variants}}


def _col(task):
    return lra_published.TASK_COLUMNS.get(task, task)


def build(root: str, out: str, name: str = "accuracy", published: bool = True,
          title: str | None = None) -> dict:
    """Writes the tables under `out`; returns the JSON-able report."""
    records = collect(root)
    acc = accuracy_table(records, published)
    par = params_table(records)
    env = machine_info()
    tasks = acc["tasks"]

    header = ["Model"] + [_col(t) for t in tasks] + ["Avg"]
    rows = [[v] + [_fmt_cell(acc["cells"][v][t]) for t in tasks] + [_fmt_avg(acc["avg"][v])]
            for v in acc["variants"]]
    lines = header_lines(title or "Accuracy (LRA Table 1 layout)", env)
    lines += [f"Test accuracy (%) of the runs under `{root}`"
              + (f"; in parentheses the LRA paper's number for the corresponding model "
                 f"({lra_published.SOURCE})" if published else "") + ". `-`: not run; `fail`: "
              "the run failed (error below). Avg: mean over ListOps, Text, Retrieval, Image, "
              "Path where finished ([k/5] when fewer). Runs trained with the settings listed "
              "per run below are not comparable to the paper's unless those match.", ""]
    sweep_info = _load(os.path.join(root, "sweep.json"))
    if sweep_info:
        lines = lines[:-1] + [
            f"Sweep settings (last invocation, {sweep_info.get('date', '?')}): config option "
            f"`{sweep_info.get('arg') or '(none)'}`, overrides "
            f"`{' '.join(sweep_info.get('sets') or []) or '(none)'}`.", ""] + lines[-1:]
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
                  "Majority %", "Params", "Wall s", "Error"]
    run_rows = []
    for r in sorted(records, key=lambda r: (tasks.index(r["task"]), r["variant"])):
        run_rows.append([
            r["task"], r["variant"], r["status"], r.get("steps"), _pct(r.get("test_accuracy")),
            _pct(r.get("best_val_accuracy")), _pct(r.get("test_majority_rate")),
            r.get("num_params"),
            None if r.get("wall_time_sec") is None else round(r["wall_time_sec"], 1),
            (r.get("error") or "").replace("|", "/")[:200]])
    lines += markdown_table(run_header, run_rows, ["l", "l", "l"] + ["r"] * 6 + ["l"])
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
              ["task", "variant", "status", "steps", "test_accuracy", "best_val_accuracy",
               "test_majority_rate", "num_params", "wall_time_sec", "error"],
              [[r["task"], r["variant"], r["status"], r.get("steps"), r.get("test_accuracy"),
                r.get("best_val_accuracy"), r.get("test_majority_rate"), r.get("num_params"),
                r.get("wall_time_sec"), r.get("error")] for r in records])
    report = {"root": root, "environment": env, "accuracy": acc, "params": par,
              "runs": [{k: v for k, v in r.items() if k != "error_text"} for r in records],
              "published_source": lra_published.SOURCE if published else None}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="sweep root (ROOT/<task>/<variant>/)")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--name", default="accuracy", help="file name stem of the outputs")
    p.add_argument("--no-published", action="store_true",
                   help="leave out the LRA paper's numbers")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    report = build(a.root, a.out, a.name, published=not a.no_published, title=a.title)
    print(f"{len(report['runs'])} runs -> {os.path.join(a.out, a.name)}.md")


if __name__ == "__main__":
    main()
