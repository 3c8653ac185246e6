"""Byte-level language modelling on real text every machine has: the Python standard library.

Task `lm`: next-byte prediction over the `.py` source files of the running interpreter's
standard library (found through `sysconfig.get_paths()["stdlib"]`; `site-packages`,
`dist-packages` and `__pycache__` are left out), or over the `.py` files under data.data_dir
when it is set (tests write small trees).

Split: each file goes whole to one split by a stable hash of its relative path (SHA-256 of the
POSIX path, first 8 bytes as an integer, divided by 2**64 -> u in [0, 1)): u < test_fraction
-> test, u < test_fraction + validation_fraction -> validation, else train. The split of a file
never depends on the other files, the Python version or the machine. Inside a split, files are
concatenated in hash order (no separator), and data.train_bytes / data.eval_bytes (0 = all) cap
how many bytes of the split are read (whole files in that order, the last one cut at the cap).

Examples: windows of data.max_len bytes that overlap by one byte (window i starts at byte
i * (max_len - 1)), so with next-token prediction inside each window every byte of a split but
its first is a target exactly once; the last window is padded and masked. Tokens are the bytes
(vocab 256). `Task.causal` is True: the objective is causal_lm (bits per byte = loss / ln 2).
task_info records the root, every file read per split with its byte count, the split's SHA-256,
and the test split's unigram entropy in bits per byte (the baseline of a model that ignores
context).
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

import numpy as np

from lra.base import BatchSource, Task, register_task

VOCAB_SIZE = 256
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def path_fraction(relpath: str) -> float:
    """Stable u in [0, 1) from the file's relative POSIX path."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def list_files(root: str) -> list[str]:
    """Relative POSIX paths of the .py files under root (sorted), excluded dirs left out."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"lm: source directory {root!r} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                out.append(rel.replace(os.sep, "/"))
    if not out:
        raise FileNotFoundError(f"lm: no .py files under {root!r}")
    return sorted(out)


def split_files(files: list[str], validation_fraction: float, test_fraction: float
                ) -> dict[str, list[str]]:
    """-> {"train", "validation", "test"}: disjoint lists, each in hash order."""
    for name, value in (("data.validation_fraction", validation_fraction),
                        ("data.test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"lm: {name} must be in (0, 1); got {value!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(f"lm: data.validation_fraction + data.test_fraction must be < 1; got "
                         f"{validation_fraction} + {test_fraction}")
    splits = {"train": [], "validation": [], "test": []}
    for rel in sorted(files, key=lambda r: (path_fraction(r), r)):
        u = path_fraction(rel)
        split = ("test" if u < test_fraction else
                 "validation" if u < test_fraction + validation_fraction else "train")
        splits[split].append(rel)
    return splits


def read_split(root: str, files: list[str], cap: int) -> tuple[bytes, list[list]]:
    """Concatenated bytes of `files` (at most `cap` bytes; 0 = all) and [[path, bytes]] read."""
    chunks, read, total = [], [], 0
    for rel in files:
        if cap and total >= cap:
            break
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        if cap:
            data = data[:cap - total]
        chunks.append(data)
        read.append([rel, len(data)])
        total += len(data)
    return b"".join(chunks), read


class WindowSource(BatchSource):
    """Windows of max_len bytes overlapping by one byte over one buffer; label = 0 (unused)."""

    def __init__(self, buffer: bytes, max_len: int):
        if max_len < 2:
            raise ValueError(f"lm: data.max_len must be >= 2 (a context and a target); got "
                             f"{max_len}")
        self.buffer = np.frombuffer(buffer, np.uint8)
        self.max_len = max_len
        n = len(self.buffer)
        self.num_windows = 0 if n < 2 else -(-(n - 1) // (max_len - 1))

    def __len__(self) -> int:
        return self.num_windows

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        pos = indices[:, None] * (self.max_len - 1) + np.arange(self.max_len)[None, :]
        mask = pos < len(self.buffer)                                     # [B, T]
        inputs = np.where(mask, self.buffer[np.minimum(pos, len(self.buffer) - 1)], 0)
        return {"inputs": inputs.astype(np.int32), "mask": mask,
                "label": np.zeros(len(indices), np.int32)}

    def labels(self) -> np.ndarray:
        """Every target byte (all but the first): Task.majority_rate is then the accuracy of
        always predicting the split's most frequent byte."""
        return self.buffer[1:].astype(np.int64)


def unigram_bits_per_byte(buffer: bytes) -> float:
    counts = np.bincount(np.frombuffer(buffer, np.uint8), minlength=VOCAB_SIZE)
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log2(p)).sum())


@register_task("lm")
def build(cfg) -> Task:
    root = cfg.get("data_dir", "") or stdlib_root()
    files = list_files(root)
    parts = split_files(files, cfg.get("validation_fraction", 0.05),
                        cfg.get("test_fraction", 0.05))
    caps = {"train": int(cfg.get("train_bytes", 0)),
            "validation": int(cfg.get("eval_bytes", 0)), "test": int(cfg.get("eval_bytes", 0))}
    for name, cap in caps.items():
        if cap < 0:
            field = "data.train_bytes" if name == "train" else "data.eval_bytes"
            raise ValueError(f"lm: {field} must be >= 0 (0 = the whole split); got {cap}")
    splits, info_splits, test_bytes = {}, {}, b""
    for name, rels in parts.items():
        data, read = read_split(root, rels, caps[name])
        source = WindowSource(data, cfg.max_len)
        if len(data) < 2:
            raise ValueError(
                f"lm: the {name} split of {root!r} has {len(data)} bytes ({len(rels)} files; "
                f"{len(files)} .py files in all); it needs at least 2. Use a directory with more "
                f"files or change data.validation_fraction / data.test_fraction")
        splits[name] = source
        info_splits[name] = {"num_files": len(read), "bytes": len(data),
                             "windows": len(source),
                             "sha256": hashlib.sha256(data).hexdigest(), "files": read}
        if name == "test":
            test_bytes = data
    origin = (f"Python {sys.version.split()[0]} standard library .py files at {root}"
              if not cfg.get("data_dir", "") else f".py files under {root}")
    return Task(name="lm", splits=splits, num_classes=VOCAB_SIZE, vocab_size=VOCAB_SIZE,
                max_len=cfg.max_len, causal=True,
                info={"origin": origin, "root": root, "num_files_found": len(files),
                      "split_rule": "sha256(relative path) -> u in [0,1): test < "
                                    f"{cfg.get('test_fraction', 0.05)} <= validation < "
                                    f"{cfg.get('test_fraction', 0.05) + cfg.get('validation_fraction', 0.05)}"
                                    " <= train",
                      "test_unigram_bits_per_byte": unigram_bits_per_byte(test_bytes),
                      "splits": info_splits})
