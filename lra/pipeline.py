"""Deterministic batching over random-access sources, fed by grain.

Training batches are a pure function of (seed, step): step s of epoch e takes the s-th slice of
a permutation drawn from (seed, e) (`train_indices`). Resuming at step s therefore continues with
exactly the batches an uninterrupted run would have seen. Evaluation walks a split in order
once; the last batch is padded and carries weight 0 on the padding rows, so every example
counts once.

The pipeline is a grain `MapDataset` whose element s is the whole batch of step s: one
vectorised `source.get_batch(indices)` (a gather for data in memory; one vectorised drawing call
for generated Pathfinder images), rather than grain's per-example `.batch()`, which would stack
examples one by one and draw images one at a time. grain computes the elements ahead:
- in worker processes (`mp_prefetch`, spawned; element s goes to worker s mod workers, the
  order out is the order in) when the source still has many examples to draw
  (`source.pending(...)`: generated Pathfinder / Path-X before their images are memoized).
  Drawing is Python and numpy holding the GIL: in threads it runs one batch at a time and
  holds up the main thread, which dispatches the training step;
- in threads (`to_iter_dataset`) otherwise: a batch of data in memory is a gather of ~0.1 ms,
  cheaper than a hand-off between processes and than starting them (seconds each).
results/pipeline_cpu.md measures both.
Either way the batches and their order are the same: a function of (seed, step) only.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np
from absl import flags

from lra._data import progress

_ENDLESS = 2 ** 62        # length of the training stream of steps (grain datasets have one)
PROCESSES_FROM = 1024     # examples still to draw from which worker processes pay off


def train_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training batch at `step` (epochs reshuffled, remainder dropped)."""
    if batch_size > num_examples:
        raise ValueError(
            f"batch size {batch_size} is larger than the training split ({num_examples} examples)")
    per_epoch = num_examples // batch_size
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[within * batch_size:(within + 1) * batch_size]


class TrainBatch:
    """step -> the training batch of that step (picklable: grain sends it to its workers)."""

    def __init__(self, source, batch_size: int, seed: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.num = len(source)

    def __call__(self, step) -> dict[str, np.ndarray]:
        return self.source.get_batch(train_indices(self.num, self.batch_size, self.seed,
                                                  int(step)))


class EvalBatch:
    """b -> batch b of one ordered pass over the first `num` examples, with weight [B]."""

    def __init__(self, source, batch_size: int, num: int):
        self.source, self.batch_size, self.num = source, batch_size, num

    def __call__(self, b) -> dict[str, np.ndarray]:
        idx = np.arange(int(b) * self.batch_size, (int(b) + 1) * self.batch_size)
        weight = (idx < self.num).astype(np.float32)          # 0 = a padding row
        batch = self.source.get_batch(np.minimum(idx, self.num - 1))
        batch["weight"] = weight
        return batch


def uses_processes(source, indices: np.ndarray, workers: int) -> bool:
    """Whether the pipeline builds batches in worker processes (else threads): with workers > 0,
    for a source that still has at least PROCESSES_FROM of `indices` to draw. Below that the
    drawing is shorter than starting the workers (seconds each: they import numpy and grain)."""
    return workers > 0 and source.pending(indices) >= PROCESSES_FROM


def dataset(make, start: int, stop: int) -> grain.MapDataset:
    """The grain MapDataset of make(start), make(start + 1), ..., make(stop - 1)."""
    return grain.MapDataset.range(start, stop).map(make)


def _iterate(ds: grain.MapDataset, processes: bool, workers: int, prefetch: int):
    if processes and workers < 1:
        raise ValueError(f"the pipeline needs workers >= 1 to use processes; got {workers}")
    if prefetch <= 0:                       # nothing ahead: in order, in this thread
        it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    elif processes:
        # grain reads absl flags (their defaults here) when it starts workers; outside an absl
        # app (tests, tools) they are unparsed and reading them raises
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # each worker reads its slice (elements w, w + workers, ...) in order, one at a time
        it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
                  .mp_prefetch(grain.MultiprocessingOptions(
                      num_workers=workers, per_worker_buffer_size=prefetch)))
    else:
        it = iter(ds.to_iter_dataset(grain.ReadOptions(
            num_threads=max(1, workers), prefetch_buffer_size=prefetch + max(1, workers))))
    try:
        for batch in it:
            # batches from workers arrive in grain's shared memory: copy them out so that
            # each block is freed as soon as it is read (the copy is ~0.1 ms)
            yield {k: np.array(v) for k, v in batch.items()} if processes else batch
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def train_batches(source, batch_size: int, *, seed: int, start_step: int = 0,
                  prefetch: int = 2, workers: int = 1, processes: bool | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from `start_step` on; each has inputs, mask, label.
    workers: processes drawing a generated source's examples, or threads otherwise;
    processes: force one or the other (None: uses_processes decides)."""
    n = len(source)
    if batch_size < 1 or start_step < 0 or workers < 0:
        raise ValueError(f"train_batches: need batch_size >= 1, start_step >= 0, workers >= 0; "
                         f"got {batch_size}, {start_step}, {workers}")
    train_indices(n, batch_size, seed, start_step)         # a too-large batch fails here
    if processes is None:
        processes = uses_processes(source, np.arange(n), workers)
    return _iterate(dataset(TrainBatch(source, batch_size, seed), start_step, _ENDLESS),
                    processes, workers, prefetch)


def eval_batches(source, batch_size: int, *, limit: int | None = None, prefetch: int = 2,
                 workers: int = 1, desc: str | None = "evaluating",
                 processes: bool | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `source` (first `limit` examples); adds weight [B] (0 = pad row).
    desc: label of the progress bar (shown once a pass takes more than a few seconds)."""
    n = len(source) if limit is None else min(limit, len(source))
    if batch_size < 1:
        raise ValueError(f"eval_batches: batch_size must be >= 1; got {batch_size}")
    if n <= 0:
        return
    num_batches = -(-n // batch_size)
    if processes is None:
        processes = uses_processes(source, np.arange(n), workers)
    batches = _iterate(dataset(EvalBatch(source, batch_size, n), 0, num_batches), processes,
                       workers, prefetch)
    if desc is None:
        yield from batches
        return
    bar = progress(n, desc, delay=5.0)
    try:
        for batch in batches:
            yield batch
            bar.update(int(batch["weight"].sum()))
    finally:
        bar.close()
        batches.close()
