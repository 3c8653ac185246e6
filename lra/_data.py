"""Helpers shared by the byte-level and tfds-backed LRA tasks (text, retrieval, image).

- `tfds_source`: `tfds.data_source(...)` (random access over ArrayRecord files, no TensorFlow
  needed) with a clear error naming the task and what to prepare when the data is missing.
- `read_all`: every record of a data source, in order.
- `ByteSource`: byte strings stored once as one buffer + offsets; batches come out as int32
  token ids [B, max_len] (the bytes, 0-255) with a padding mask. Padding is the mask only: a
  byte 0 is a real token.
- `progress`: the progress bar (count, rate, ETA) of data generation and evaluation passes.
- `spawn_without_main`: worker processes that do not re-import the __main__ script.
- `at_least`, `add_processes`: the generators' command-line counts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types

import numpy as np

from lra.base import BatchSource

TFDS_HOWTO = (
    "Prepare it once in the ArrayRecord format (random access, no TensorFlow at training "
    "time), e.g. in an environment with tensorflow installed: `tfds build {name} "
    "--file_format=array_record --data_dir=DIR`, then set data.data_dir=DIR (empty: tfds's "
    "default, $TFDS_DATA_DIR or ~/tensorflow_datasets). Expected layout: "
    "DIR/{name}/<config>/<version>/{name}-<split>.array_record-*.")


def tfds_source(task: str, name: str, split: str, data_dir: str | None):
    """tfds.data_source(name, split=split) without downloading; FileNotFoundError if absent."""
    import tensorflow_datasets as tfds  # imported here: only text and image need it

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types (AssertionError, NotImplementedError...)
        where = data_dir or "tfds's default data dir"
        raise FileNotFoundError(
            f"{task}: tfds dataset {name!r} (split {split!r}) is not available in {where} (not "
            f"there, or not prepared in the ArrayRecord format; tfds says {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). " + TFDS_HOWTO.format(name=name)) from e


def read_all(source, chunk: int = 1024) -> list:
    """All records of a random-access source, in order (batched reads where supported)."""
    out = []
    n = len(source)
    batched = hasattr(source, "__getitems__")
    for start in range(0, n, chunk):
        keys = list(range(start, min(start + chunk, n)))
        if batched:
            try:
                out.extend(source.__getitems__(keys))
                continue
            except TypeError:   # some sources (tfds's mock) only read one record at a time
                batched = False
        out.extend(source[i] for i in keys)
    return out


def to_bytes(text) -> bytes:
    """UTF-8 bytes of a tfds Text feature (str or bytes, depending on the decoder)."""
    if isinstance(text, bytes):
        return text
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


class ByteSource(BatchSource):
    """Byte strings (first max_len bytes kept) with labels; random access and get_batch."""

    def __init__(self, texts: list[bytes], labels, max_len: int):
        self.max_len = max_len
        clipped = [t[:max_len] for t in texts]
        self.lengths = np.fromiter((len(t) for t in clipped), np.int64, len(clipped))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.buffer = np.frombuffer(b"".join(clipped), np.uint8)
        self.label = np.asarray(labels, np.int32)
        if len(self.label) != len(clipped):
            raise ValueError(f"ByteSource: {len(clipped)} texts but {len(self.label)} labels")

    def tokens(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """-> inputs int32 [B, max_len] (0 where padded), mask bool [B, max_len]."""
        indices = np.asarray(indices, np.int64)
        lengths = self.lengths[indices]
        pos = np.arange(self.max_len)
        mask = pos[None, :] < lengths[:, None]                           # [B, T]
        gather = np.where(mask, self.offsets[indices][:, None] + pos[None, :], 0)
        inputs = np.where(mask, self.buffer[gather] if len(self.buffer) else 0, 0)
        return inputs.astype(np.int32), mask

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        inputs, mask = self.tokens(indices)
        return {"inputs": inputs, "mask": mask, "label": self.label[np.asarray(indices)]}


def at_least(minimum: int):
    """argparse type: an integer >= minimum ("--num 0" -> "argument --num: must be >= 1")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value
    return parse


def add_processes(parser: argparse.ArgumentParser, what: str) -> None:
    """--processes: how many worker processes do `what` (default: every core)."""
    parser.add_argument("--processes", type=at_least(1), default=os.cpu_count() or 1,
                        help=f"worker processes {what} (default: every core); the files do not "
                             f"depend on it")


def progress(total: int | None, desc: str, unit: str = "ex", initial: int = 0,
             delay: float = 0.0):
    """A progress bar on stderr with count, rate and ETA, for everything a person waits for
    (data generation, evaluation passes), shown once `delay` seconds have passed. On a terminal
    it redraws twice a second; when stderr is a file or a pipe it writes a line every 30 s.
    LRA_PROGRESS=0 turns the bars off."""
    import os

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=tty,
                mininterval=0.5 if tty else 30.0, smoothing=0.1, file=sys.stderr, delay=delay,
                disable=os.environ.get("LRA_PROGRESS", "1") == "0")


@contextlib.contextmanager
def spawn_without_main():
    """Processes spawned inside this block do not import the __main__ script or module.

    multiprocessing's spawn re-imports __main__ in every child (train.py: jax, flax, orbax; many
    seconds on a busy machine) although our workers run functions of lra modules only, which
    they import when they unpickle them. For the few milliseconds that the children are
    started, __main__ is a blank module, so they skip it."""
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved
