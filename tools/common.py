"""What every table and figure records next to its numbers: machine, CPU, device, versions, date.

    env = machine_info(note="shared machine: other jobs were running")
    lines = header_lines("Speed and memory", env)      # Markdown lines for a table header
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import socket
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001  (absent or broken: say so in the table)
        return "n/a"


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        return head or "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info(note: str = "") -> dict:
    """Machine, CPU, device, library versions, date, git commit and current load."""
    import jax

    devices = jax.devices()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_cores": cpu_count(),
        "memory_gib": _memory_gib(),
        "backend": jax.default_backend(),
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "git_commit": _git_commit(),
        "load_average": load,
        "note": note,
    }


def shared_machine_note(threshold: float = 1.0) -> str:
    """A note for timing tables when the 1-minute load average exceeds `threshold`."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    if load <= threshold:
        return ""
    return (f"shared machine: load average {load:.1f} at the start (other jobs were running); "
            f"timings are lower and noisier than on an idle machine, the ratios against dense "
            f"of the same run are the figures to read")


def header_lines(title: str, env: dict) -> list[str]:
    """Markdown lines: a title and the environment the numbers were measured in."""
    lines = [f"# {title}", ""]
    lines.append(f"- Date: {env.get('date', 'n/a')}; git commit {env.get('git_commit', 'n/a')}")
    lines.append(f"- Machine: {env.get('cpu', 'n/a')}, {env.get('cpu_cores', '?')} cores, "
                 f"{env.get('memory_gib', '?')} GiB RAM ({env.get('platform', 'n/a')})")
    lines.append(f"- Device: {env.get('device', 'n/a')} (JAX backend {env.get('backend', '?')})")
    lines.append(f"- Versions: jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax "
                 f"{env.get('flax')}, optax {env.get('optax')}, python {env.get('python')}")
    if env.get("load_average") is not None:
        lines.append(f"- Load average at start (1/5/15 min): "
                     f"{', '.join(str(x) for x in env['load_average'])}"
                     + (f"; at the end: {', '.join(str(x) for x in env['load_average_end'])}"
                        if env.get("load_average_end") else ""))
    if env.get("note"):
        lines.append(f"- Note: {env['note']}")
    lines.append("")
    return lines


def markdown_table(header: list[str], rows: list[list], align: list[str] | None = None) -> list[str]:
    """A GitHub Markdown table; align per column: "l" or "r" (default: first l, rest r)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = [":---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        out.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return out


def write_csv(path: str, header: list[str], rows: list[list]) -> None:
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow(["" if c is None else c for c in row])


def write_text(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def registered_tasks() -> list[str]:
    """The registered task names (lra.TASKS; each has its configs/<task>.py)."""
    import lra

    return sorted(lra.TASKS)


# LRA Table 1 column order; tasks not in it come after, alphabetically.
LRA_TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
# The five tasks LRA averages over (Path-X is reported separately: FAIL for all models).
LRA_AVERAGED = ("listops", "text", "retrieval", "image", "pathfinder")


def task_order(tasks) -> list[str]:
    tasks = list(dict.fromkeys(tasks))
    known = [t for t in LRA_TASK_ORDER if t in tasks]
    return known + sorted(t for t in tasks if t not in LRA_TASK_ORDER)
