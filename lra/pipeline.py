"""Deterministic batching over random-access sources, with background prefetch.

Training batches are a pure function of (seed, step): step s of epoch e takes the s-th slice of
a permutation drawn from (seed, e). Resuming at step s therefore continues with exactly the
batches an uninterrupted run would have seen. Evaluation walks a split in order once; the last
batch is padded and carries weight 0 on the padding rows, so every example counts once.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Iterator

import numpy as np


def _gather(source, indices: np.ndarray) -> dict[str, np.ndarray]:
    if hasattr(source, "get_batch"):
        return source.get_batch(indices)
    examples = [source[int(i)] for i in indices]
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def train_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training batch at `step` (epochs reshuffled, remainder dropped)."""
    if batch_size > num_examples:
        raise ValueError(
            f"batch size {batch_size} is larger than the training split ({num_examples} examples)")
    per_epoch = num_examples // batch_size
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[within * batch_size:(within + 1) * batch_size]


def train_batches(source, batch_size: int, *, seed: int, start_step: int = 0,
                  prefetch: int = 2, workers: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from `start_step` on; each has inputs, mask, label."""
    n = len(source)

    def make(step):
        return _gather(source, train_indices(n, batch_size, seed, step))

    return _prefetched(make, start_step, None, prefetch, workers)


def eval_batches(source, batch_size: int, *, limit: int | None = None,
                 prefetch: int = 2, workers: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `source` (first `limit` examples); adds weight [B] (0 = pad row)."""
    n = len(source) if limit is None else min(limit, len(source))
    num_batches = -(-n // batch_size)

    def make(b):
        idx = np.arange(b * batch_size, (b + 1) * batch_size)
        weight = (idx < n).astype(np.float32)
        batch = _gather(source, np.minimum(idx, n - 1))
        batch["weight"] = weight
        return batch

    return _prefetched(make, 0, num_batches, prefetch, workers)


def _prefetched(make, start, stop, prefetch, workers):
    """Yields make(start), make(start+1), ... (until stop) computed ahead in threads."""
    if prefetch <= 0:
        step = start
        while stop is None or step < stop:
            yield make(step)
            step += 1
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    pending: list[concurrent.futures.Future] = []
    next_step = start
    closed = threading.Event()
    try:
        while True:
            while len(pending) < prefetch + workers - 1 + 1 and (stop is None or next_step < stop):
                pending.append(pool.submit(make, next_step))
                next_step += 1
            if not pending:
                return
            yield pending.pop(0).result()
    finally:
        closed.set()
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
