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
A generated source's unmade examples are made a group at a time (`_Ahead`: about DRAW_AHEAD
examples, the batches the same worker builds next), because the vectorised drawing's Python
overhead is per call: 64 Pathfinder-32 images drawn together cost a third to a quarter of what
eight calls of 8 do. results/pipeline_cpu.md measures both modes.
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
DRAW_AHEAD = 64           # examples still to draw that a worker makes together (_Ahead)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in training epoch `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training batch at `step` (epochs reshuffled, remainder dropped)."""
    if batch_size > num_examples:
        raise ValueError(
            f"batch size {batch_size} is larger than the training split ({num_examples} examples)")
    per_epoch = num_examples // batch_size
    epoch, within = divmod(step, per_epoch)
    perm = epoch_permutation(num_examples, seed, epoch)
    return perm[within * batch_size:(within + 1) * batch_size]


def draw_ahead(batch_size: int) -> int:
    """Batches whose unmade examples are made together: about DRAW_AHEAD examples per group."""
    return max(1, -(-DRAW_AHEAD // batch_size))


class _Ahead:
    """Makes the examples of a group of batches at once: at element e with (e // stride) % ahead
    == 0, the batches e, e + stride, ..., e + (ahead - 1) * stride, i.e. the elements the same
    worker builds next (grain gives element e to worker e mod workers). Generated Pathfinder
    images cost a third to a quarter as much each when drawn 64 at a time as 8 at a time; the
    batches themselves do not change (a source's example depends only on its index)."""

    def __init__(self, source, ahead: int, stride: int):
        self.source, self.ahead, self.stride = source, ahead, max(1, stride)

    def __call__(self, element: int, batch_indices) -> None:
        if self.ahead > 1 and (element // self.stride) % self.ahead == 0:
            group = np.concatenate([batch_indices(element + j * self.stride)
                                    for j in range(self.ahead)])
            if self.source.pending(group):
                self.source.make(group)


class TrainBatch:
    """step -> the training batch of that step, train_indices(...) (picklable: grain sends it
    to its workers). Keeps the permutations of the last two epochs: drawing one every step was
    most of the cost of a batch of data in memory from a few thousand examples on (on the
    shared 2-core CPU, load 13: 1.3 ms a batch of 8 for 2,000 examples, 43 ms for 160,000,
    against 0.13 ms with the cache)."""

    def __init__(self, source, batch_size: int, seed: int, ahead: int = 1, stride: int = 1):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.num = len(source)
        self.per_epoch = self.num // batch_size
        self.make_ahead = _Ahead(source, ahead, stride)
        self._perms: dict[int, np.ndarray] = {}

    def indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = epoch_permutation(self.num, self.seed, epoch)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return perm[within * self.batch_size:(within + 1) * self.batch_size]

    def __call__(self, step) -> dict[str, np.ndarray]:
        self.make_ahead(int(step), self.indices)
        return self.source.get_batch(self.indices(int(step)))

    def __getstate__(self):
        return {**self.__dict__, "_perms": {}}


class EvalBatch:
    """b -> batch b of one ordered pass over the first `num` examples, with weight [B]."""

    def __init__(self, source, batch_size: int, num: int, ahead: int = 1, stride: int = 1):
        self.source, self.batch_size, self.num = source, batch_size, num
        self.make_ahead = _Ahead(source, ahead, stride)

    def indices(self, b: int) -> np.ndarray:
        idx = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
        return np.minimum(idx, self.num - 1)

    def __call__(self, b) -> dict[str, np.ndarray]:
        b = int(b)
        self.make_ahead(b, self.indices)
        idx = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
        batch = self.source.get_batch(self.indices(b))
        batch["weight"] = (idx < self.num).astype(np.float32)          # 0 = a padding row
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
    make = TrainBatch(source, batch_size, seed, draw_ahead(batch_size), workers)
    return _iterate(dataset(make, start_step, _ENDLESS), processes, workers, prefetch)


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
    make = EvalBatch(source, batch_size, n, draw_ahead(batch_size), workers)
    batches = _iterate(dataset(make, 0, num_batches), processes, workers, prefetch)
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
