"""Metrics out of the loop: metrics.jsonl (one JSON object per row), TensorBoard, a console."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional
            self.tb = None

    def write(self, row: dict, prefix: str = "train") -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in row.items()}
        row.setdefault("time", time.time())
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row.get("step", 0)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items() if k not in ("time",))
        self.echo(text)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
