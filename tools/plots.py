"""Plots (matplotlib PNG) of the benchmark and report JSON files.

    python -m tools.plots --speed results/speed_cpu.json --cost results/cost_cpu.json \\
        --accuracy results/accuracy.json --out results/

speed:    steps/s and memory against sequence length, one line per variant (log-log), and
          the speed relative to dense of the same run;
cost:     compiled FLOPs and temporary bytes of the attention op against length (log-log);
accuracy: test accuracy per task, one bar per variant, the LRA paper's number as a marker.
Each figure's footer names the machine, device and date recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _style(i: int):
    plt = _plt()
    colors = plt.get_cmap("tab20").colors
    return {"color": colors[i % len(colors)], "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4],
            "marker": "osv^D<>ph*"[i % 10], "markersize": 4}


def _footer(fig, env: dict):
    text = (f"{env.get('cpu', '?')} x{env.get('cpu_cores', '?')}, device {env.get('device', '?')}, "
            f"jax {env.get('jax', '?')}, {env.get('date', '?')}"
            + (f" - {env['note']}" if env.get("note") else ""))
    fig.text(0.01, 0.005, text, fontsize=7, color="#555555")


def _save(plt, fig, env: dict, path: str) -> str:
    """Footer (machine, versions, date), layout, PNG at `path`; the figure is closed."""
    _footer(fig, env)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _variants(names):
    names = list(dict.fromkeys(names))
    return (["dense"] if "dense" in names else []) + [n for n in names if n != "dense"]


def plot_speed(result: dict, path: str) -> str:
    plt = _plt()
    cells = result["cells"]
    variants = _variants(c["variant"] for c in cells)
    dense = {c["length"]: c.get("steps_per_sec") for c in cells if c["variant"] == "dense"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    for i, v in enumerate(variants):
        pts = sorted((c["length"], c) for c in cells if c["variant"] == v)
        sp = [(L, c["steps_per_sec"]) for L, c in pts if c.get("steps_per_sec")]
        mem = [(L, (c.get("device_peak_bytes") or c.get("compiled_bytes")) / 2**30)
               for L, c in pts if c.get("device_peak_bytes") or c.get("compiled_bytes")]
        rel = [(L, s / dense[L]) for L, s in sp if dense.get(L)]
        st = _style(i)
        st["linewidth"] = 2.5 if v == "dense" else 1.2
        st["color"] = "black" if v == "dense" else st["color"]
        for ax, data in zip(axes, (sp, mem, rel)):
            if data:
                ax.plot(*zip(*data), label=v, **st)
    s = result.get("settings", {})
    axes[0].set_title("\n".join(textwrap.wrap(
        f"Training steps/s (batch {s.get('batch', '?')}; {s.get('model_desc', '')})", 60)),
        fontsize=9)
    axes[1].set_title("Peak memory, GB ("
                      + ("device peak" if result.get("device_memory") else "compiled buffers")
                      + ")", fontsize=9)
    axes[2].set_title("Speed relative to dense (same run)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log", base=2)
    axes[2].axhline(1.0, color="black", linewidth=0.8)
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, result.get("environment", {}), path)


def plot_cost(result: dict, path: str) -> str:
    plt = _plt()
    lengths = result["settings"]["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    for i, row in enumerate(sorted(result["rows"], key=lambda r: r["variant"] != "dense")):
        st = _style(i)
        st["linewidth"] = 2.5 if row["variant"] == "dense" else 1.2
        st["color"] = "black" if row["variant"] == "dense" else st["color"]
        for ax, key in zip(axes, ("matmul_flops", "temp_bytes")):
            pts = [(n, row["cells"][str(n) if str(n) in row["cells"] else n]
                    .get("forward", {}).get(key)) for n in lengths]
            pts = [(n, y) for n, y in pts if y]
            if pts:
                e = row.get(f"forward_{key}_exponent")
                ax.plot(*zip(*pts), label=f"{row['variant']} (n^{e:.2f})" if e else row["variant"],
                        **st)
    axes[0].set_title("Attention op: matmul FLOPs (forward; from the jaxpr, loops x trip count)",
                      fontsize=9)
    axes[1].set_title("Attention op: compiled temporary bytes (forward)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, result.get("environment", {}), path)


def accuracy_bars(report: dict) -> list[tuple[str, str, float | None, object]]:
    """(variant, task, test accuracy % or None, published) per bar, in drawing order."""
    acc = report["accuracy"]
    return [(v, t, acc["cells"][v][t].get("accuracy"), acc["cells"][v][t].get("published"))
            for v in acc["variants"] for t in acc["tasks"]]


def plot_accuracy(report: dict, path: str) -> str:
    import numpy as np

    from tools import lra_published
    plt = _plt()
    acc = report["accuracy"]
    tasks, variants = acc["tasks"], acc["variants"]
    bars = accuracy_bars(report)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 + 0.45 * len(variants) * len(tasks)), 5.2))
    width = 0.8 / max(len(variants), 1)
    shown = False
    for i, v in enumerate(variants):
        mine = [b for b in bars if b[0] == v]
        xs = [tasks.index(t) - 0.4 + width * (i + 0.5) for _, t, _, _ in mine]
        ax.bar(xs, [a if a is not None else 0 for _, _, a, _ in mine], width,
               color="black" if v == "dense" else _style(i)["color"], label=v)
        pts = [(x, p) for x, (_, _, _, p) in zip(xs, mine) if isinstance(p, (int, float))]
        if pts:
            ax.scatter(*zip(*pts), marker="_", s=120, color="red", zorder=3,
                       label=None if shown else "LRA paper")
            shown = True
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels([lra_published.TASK_COLUMNS.get(t, t) for t in tasks])
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Accuracy per task (runs under {report.get('root', '?')}); red: LRA paper",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, report.get("environment", {}), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed", default=None, help="JSON of tools.bench_speed")
    p.add_argument("--cost", default=None, help="JSON of tools.cost_table")
    p.add_argument("--accuracy", default=None, help="JSON of tools.report")
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    done = []
    for arg, fn in ((a.speed, plot_speed), (a.cost, plot_cost), (a.accuracy, plot_accuracy)):
        if arg:
            with open(arg) as f:
                data = json.load(f)
            stem = os.path.splitext(os.path.basename(arg))[0]
            done.append(fn(data, os.path.join(a.out, f"{stem}.png")))
    for d in done:
        print(f"-> {d}")
    if not done:
        p.error("nothing to plot: give --speed, --cost and/or --accuracy")


if __name__ == "__main__":
    main()
