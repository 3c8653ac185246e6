"""Sweep attention variants over LRA tasks: one workdir per run, resumable, failure-tolerant.

    python -m tools.sweep --tasks listops --variants dense,local --root runs/sweep \\
        --set train.steps=200 --arg small
    python -m tools.sweep --tasks all --variants all --root runs/full

Each run trains `configs/<task>.py:<variant>[,<arg>]` in ROOT/<task>/<variant>/ with
`python train.py` in its own subprocess (a crash, an out-of-memory kill or a hung compile ends
that run only). Per run the sweep writes status.json (status, command, times, return code) and
log.txt (the run's stdout and stderr, written as it runs); a failed run also gets error.txt
(the traceback).
Re-running the same command skips finished runs (results.json present), resumes unfinished
ones from their latest checkpoint (the training loop does that) and retries failed ones.
ROOT/sweep.json lists every run of the latest invocation and its status.

    python -m tools.sweep --tasks listops --variants dense,local --root runs/spt --arg small \
        --pretrain denoise --pretrain-set train.steps=1500 --set train.steps=1500 --seeds 0,1,2

--seeds: one run per seed (config seed), in ROOT/<task>/<variant>/seed_<n>/.
--pretrain OBJECTIVE: each entry is a pretrain -> fine-tune pair: first the same config with
train.objective=OBJECTIVE (denoise: masked-token self-pretraining; causal_lm) and the
--pretrain-set overrides in <workdir>/pretrain/, then the run itself with
train.init_from=<workdir>/pretrain (encoder loaded, head fresh). The entry is finished when the
fine-tune is; a finished pretrain is not run again, a failed one fails the entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

from tools.common import REPO_ROOT, registered_tasks, task_order

FINISHED, UNFINISHED, FAILED, NEW, RUNNING = "finished", "unfinished", "failed", "new", "running"
# What a sweep does with a run in each state (finished runs are skipped).
ACTIONS = {NEW: "started", UNFINISHED: "resumed", FAILED: "retried"}


@dataclasses.dataclass(frozen=True)
class Run:
    task: str
    variant: str
    workdir: str
    seed: int | None = None       # None: the config's own seed
    pretrain: str = ""            # objective of a pretraining stage before this run ("": none)
    init_from: str = ""           # workdir whose encoder this run starts from


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_list(value: str, valid: list[str], what: str) -> list[str]:
    """'a,b' or 'all' -> names; ValueError naming what is valid otherwise."""
    if value.strip() == "all":
        return list(valid)
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--{what}: empty list; give names or 'all' (valid: {', '.join(valid)})")
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"--{what}: unknown {', '.join(map(repr, bad))}; valid: "
                         f"{', '.join(valid)} or 'all'")
    return list(dict.fromkeys(names))


def parse_sets(sets: list[str]) -> list[tuple[str, str]]:
    """['train.steps=200'] -> [('train.steps', '200')]; ValueError on a malformed item."""
    out = []
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or key.strip().startswith("-"):
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. train.steps=200")
        out.append((key.strip(), value.strip()))
    return out


def plan(tasks: list[str], variants: list[str], root: str, seeds=None,
         pretrain: str = "") -> list[Run]:
    runs = []
    for t in task_order(tasks):
        for v in variants:
            for seed in (seeds or [None]):
                wdir = os.path.join(root, t, v) if seed is None else \
                    os.path.join(root, t, v, f"seed_{seed}")
                runs.append(Run(t, v, wdir, seed, pretrain))
    return runs


def pretrain_run(run: Run) -> Run:
    """The pretraining stage of a pretrain -> fine-tune entry."""
    return Run(run.task, run.variant, os.path.join(run.workdir, "pretrain"), run.seed)


def parse_seeds(value: str) -> list[int] | None:
    if not value.strip():
        return None
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {value!r}: expected comma-separated integers, e.g. 0,1,2") \
            from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {value!r}: expected non-negative integers, e.g. 0,1,2")
    return list(dict.fromkeys(seeds))


def read_status(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, "status.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_state(workdir: str) -> str:
    """finished (results.json), failed (last attempt failed), unfinished (started), or new."""
    if os.path.exists(os.path.join(workdir, "results.json")):
        return FINISHED
    if read_status(workdir).get("status") == FAILED:
        return FAILED
    if os.path.exists(os.path.join(workdir, "config.json")) or \
            os.path.isdir(os.path.join(workdir, "checkpoints")):
        return UNFINISHED
    return NEW


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def command_for(run: Run, sets, arg: str) -> list[str]:
    spec = run.variant + (f",{arg}" if arg else "")
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train.py"),
           f"--config={os.path.join(REPO_ROOT, 'configs', run.task + '.py')}:{spec}",
           f"--workdir={os.path.abspath(run.workdir)}"]
    cmd += [f"--config.{k}={v}" for k, v in sets]
    if run.seed is not None:
        cmd.append(f"--config.seed={run.seed}")
    if run.init_from:
        cmd.append(f"--config.train.init_from={os.path.abspath(run.init_from)}")
    return cmd


def error_text(stderr: str, limit: int = 120) -> str:
    """The last traceback in stderr (or its last lines when there is none)."""
    lines = stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    lines = lines[starts[-1]:] if starts else lines[-40:]
    return "\n".join(lines[-limit:])


def execute(run: Run, sets, arg: str, timeout: float | None = None, echo=print,
            pretrain_sets=()) -> dict:
    """Runs one training subprocess (two for a pretrain -> fine-tune entry: the pretraining
    first, unless finished); writes status.json, log.txt, error.txt. -> status dict."""
    if run.pretrain:
        pre = pretrain_run(run)
        pre_status = {"status": FINISHED}
        if run_state(pre.workdir) != FINISHED:
            pre_sets = list(sets) + [("train.objective", run.pretrain)] + list(pretrain_sets)
            pre_status = execute(pre, pre_sets, arg, timeout, echo)
        if pre_status["status"] != FINISHED:
            status = {"task": run.task, "variant": run.variant, "status": FAILED,
                      "pretrain": pre.workdir, "started": _now(), "ended": _now(),
                      "error": f"pretraining ({run.pretrain}) failed: "
                               f"{pre_status.get('error', '')}"}
            os.makedirs(run.workdir, exist_ok=True)
            _write_json(os.path.join(run.workdir, "status.json"), status)
            with open(os.path.join(run.workdir, "error.txt"), "w") as f:
                f.write(status["error"] + f"\n(see {os.path.join(pre.workdir, 'error.txt')})\n")
            echo(f"[{run.task}/{run.variant}] {FAILED}: {status['error']}")
            return status
        run = dataclasses.replace(run, pretrain="", init_from=pre.workdir)
    os.makedirs(run.workdir, exist_ok=True)
    before = run_state(run.workdir)
    cmd = command_for(run, sets, arg)
    status = {"task": run.task, "variant": run.variant, "status": RUNNING, "before": before,
              "command": cmd, "started": _now()}
    status_path = os.path.join(run.workdir, "status.json")
    _write_json(status_path, status)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log_path = os.path.join(run.workdir, "log.txt")
    t0 = time.time()
    # The run writes straight into log.txt (tail -f it to follow a run; it outlives a killed
    # sweep instead of dying on a closed pipe).
    with open(log_path, "a") as log:
        log.write(f"===== {status['started']} {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        try:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
            extra = ""
        except subprocess.TimeoutExpired:
            rc = None
            extra = f"\nTimeoutError: run exceeded --timeout {timeout} s and was killed\n"
    with open(log_path) as log:
        log.seek(start)
        err = log.read() + extra
    status.update(returncode=rc, ended=_now(), seconds=round(time.time() - t0, 1))
    error_path = os.path.join(run.workdir, "error.txt")
    if rc == 0 and os.path.exists(os.path.join(run.workdir, "results.json")):
        status["status"] = FINISHED
        if os.path.exists(error_path):
            os.remove(error_path)
    else:
        status["status"] = FAILED
        if rc is not None and rc < 0:
            err += f"\nkilled by signal {-rc} (out of memory?)\n"
        elif rc == 0:
            err += "\ntrain.py exited 0 but wrote no results.json\n"
        text = error_text(err)
        status["error"] = text.splitlines()[-1] if text else f"exit code {rc}"
        with open(error_path, "w") as f:
            f.write(text + "\n")
    _write_json(status_path, status)
    echo(f"[{run.task}/{run.variant}] {status['status']} in {status['seconds']} s"
         + (f": {status['error']}" if status["status"] == FAILED else ""))
    return status


def sweep(tasks: list[str], variants: list[str], root: str, sets=(), arg: str = "",
          timeout: float | None = None, retry_failed: bool = True, echo=print, seeds=None,
          pretrain: str = "", pretrain_sets=()) -> list[dict]:
    """Runs every (task, variant[, seed]) not yet finished; returns one summary dict per run."""
    os.makedirs(root, exist_ok=True)
    summary = []
    runs = plan(tasks, variants, root, seeds, pretrain)
    for n, run in enumerate(runs, 1):
        state = run_state(run.workdir)
        entry = {"task": run.task, "variant": run.variant, "workdir": run.workdir,
                 "before": state}
        if run.seed is not None:
            entry["seed"] = run.seed
        if run.pretrain:
            entry["pretrain"] = pretrain_run(run).workdir
        if state == FINISHED or (state == FAILED and not retry_failed):
            echo(f"[{n}/{len(runs)}] {run.task}/{run.variant}: {state}, skipped")
            entry["status"] = state
            entry["action"] = "skipped"
        else:
            echo(f"[{n}/{len(runs)}] {run.task}/{run.variant}: {state}, {ACTIONS[state]}")
            result = execute(run, sets, arg, timeout=timeout, echo=echo,
                             pretrain_sets=pretrain_sets)
            entry["status"] = result["status"]
            entry["action"] = ACTIONS[state]
            if result["status"] == FAILED:
                entry["error"] = result["error"]
        summary.append(entry)
    _write_json(os.path.join(root, "sweep.json"), {
        "date": _now(), "tasks": tasks, "variants": variants, "arg": arg,
        "sets": [f"{k}={v}" for k, v in sets], "seeds": seeds, "pretrain": pretrain,
        "pretrain_sets": [f"{k}={v}" for k, v in pretrain_sets], "runs": summary})
    return summary


def exit_on_sigterm():
    """SIGTERM ends the sweep like Ctrl-C: the running train.py is killed with it (subprocess.run
    kills its child when interrupted), and the run resumes on the next invocation."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass


def main(argv=None) -> int:
    import attention

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", required=True, help="comma-separated task names, or 'all'")
    p.add_argument("--variants", required=True, help="comma-separated variants, or 'all'")
    p.add_argument("--root", required=True, help="sweep directory; runs go to ROOT/task/variant")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every run, e.g. train.steps=200 (repeatable)")
    p.add_argument("--arg", default="", help="config options after the variant, e.g. tiny")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default none)")
    p.add_argument("--no-retry-failed", action="store_true", help="skip runs that failed before")
    p.add_argument("--seeds", default="", help="comma-separated seeds: one run each (seed_<n>/)")
    p.add_argument("--pretrain", default="", choices=("", "denoise", "causal_lm"),
                   help="pretrain with this objective first, then fine-tune from it")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override for the pretraining stage only, e.g. train.steps=1000")
    a = p.parse_args(argv)
    if a.pretrain_set and not a.pretrain:
        raise ValueError("--pretrain-set needs --pretrain OBJECTIVE")
    tasks = parse_list(a.tasks, registered_tasks(), "tasks")
    variants = parse_list(a.variants, attention.names(), "variants")
    summary = sweep(tasks, variants, a.root, parse_sets(a.set), a.arg, a.timeout,
                    retry_failed=not a.no_retry_failed, seeds=parse_seeds(a.seeds),
                    pretrain=a.pretrain, pretrain_sets=parse_sets(a.pretrain_set))
    counts = {}
    for e in summary:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    print("sweep: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 1 if counts.get(FAILED) else 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
