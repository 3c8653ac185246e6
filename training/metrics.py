"""Metrics out of the loop: metrics.jsonl (one strict-JSON object per row), TensorBoard, a
console, and the monitor that turns the train step's on-device measurements into logged rows
and stops the run on a non-finite step."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


class NonFiniteError(FloatingPointError):
    """A train step produced a non-finite loss, gradient or update (nothing of it was applied)."""


def finite_or_none(value):
    """Strict JSON: NaN and +-Infinity become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str, obj) -> None:
    """Atomically writes strict JSON (no NaN/Infinity tokens)."""
    with open(path + ".tmp", "w") as f:
        json.dump(finite_or_none(obj), f, indent=2, allow_nan=False)
    os.replace(path + ".tmp", path)


def trim_rows(path: str, last_step: int) -> int:
    """Keeps the rows of metrics.jsonl up to `last_step` (a resumed run writes the later ones
    again) and drops a line cut by a kill. Returns the number of rows dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(row.get("step", 0)) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return dropped


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
        """In a multi-process run only process 0 writes (files and console)."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self.bar = self.file = self.tb = None
        if jax.process_index() != 0:
            return
        trim_rows(self.path, start_step)
        self.file = open(self.path, "a")
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                            unit="step")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional
            self.tb = None

    def write(self, row: dict, prefix: str = "train") -> None:
        if self.file is None:
            return
        row = finite_or_none(row)
        row.setdefault("time", time.time())
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        step = row.get("step", 0)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items() if k not in ("time",))
        if self.bar is None and row.get("steps_per_sec"):   # no bar (not a terminal): ETA here
            left = (self.total_steps - step) / row["steps_per_sec"]
            text += f" eta {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        self.echo(text)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.file is not None:
            print(text, flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


class TrainMonitor:
    """Collects the train step's measurements on device and, at each check, fetches them,
    stops on a non-finite step (naming it) and writes one averaged row with throughput."""

    def __init__(self, writer: MetricsWriter, lr_schedule, batch_size: int, last_checkpoint):
        self.writer, self.lr, self.batch_size = writer, lr_schedule, batch_size
        self.last_checkpoint = last_checkpoint      # () -> step of the newest checkpoint or None
        self.pending: list = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """Evaluations and saves do not count against steps/s."""
        self.t0, self.steps = time.time(), 0

    def add(self, metrics) -> None:
        self.pending.append(metrics)
        self.steps += 1
        self.writer.advance(1)

    def check(self, step: int) -> None:
        """NonFiniteError naming the first non-finite step; else logs the rows since the last
        check as one row at `step`."""
        if not self.pending:
            return
        rows = jax.device_get(self.pending)
        self.pending = []
        for i, m in enumerate(rows):
            if not bool(m["finite"]):
                self._stop(step - len(rows) + i + 1, m)
        dt = max(time.time() - self.t0, 1e-9)
        row = {"step": step, "split": "train"}
        for k in ("loss", "accuracy", "grad_norm", "param_norm"):
            row[k] = float(np.mean([float(m[k]) for m in rows]))
        for k in rows[0].get("aux", {}):        # auxiliary losses (e.g. recon_loss)
            row[k] = float(np.mean([float(m["aux"][k]) for m in rows]))
        row["learning_rate"] = float(self.lr(step - 1))
        row["steps_per_sec"] = self.steps / dt
        row["examples_per_sec"] = self.steps * self.batch_size / dt
        self.writer.write(row)
        self.restart_clock()

    def _stop(self, bad_step: int, m) -> None:
        what = ("loss or gradient" if not bool(m["grads_finite"])
                else "update (new parameters or optimizer state)")
        last = self.last_checkpoint()
        resume = (f"the newest checkpoint is from step {last}" if last is not None
                  else "there is no checkpoint yet")
        raise NonFiniteError(
            f"non-finite {what} at step {bad_step} (loss {float(m['loss'])}, grad norm "
            f"{float(m['grad_norm'])}): nothing of that step was applied and the run is stopped; "
            f"{resume}. To continue with a lower learning rate or a gradient clip, rerun the same "
            f"command with e.g. --config.train.learning_rate=<lower> (or "
            f"--config.train.grad_clip=1.0) and --config.train.change_on_resume=True.")
