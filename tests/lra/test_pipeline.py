"""The grain input pipeline: batches a function of (seed, step) in train_indices order, resume,
evaluation weights on padded rows, worker processes giving the same batches as threads."""

import pickle
import time

import numpy as np
import pytest

from lra import _pathfinder_gen as gen
from lra import pipeline
from lra.base import ArraySource
from lra.pathfinder import GeneratedSource


def numbered(n, length=3):
    """A source whose example i has label i and inputs i * 10 + position."""
    inputs = np.arange(n)[:, None] * 10 + np.arange(length)[None, :]
    return ArraySource(inputs.astype(np.int32), np.ones((n, length), bool),
                       np.arange(n, dtype=np.int32))


def take(it, k):
    out = [next(it) for _ in range(k)]
    it.close()
    return out


@pytest.mark.parametrize("prefetch,workers", [(0, 1), (2, 1), (3, 2)])
def test_train_batches_are_train_indices_in_step_order(prefetch, workers):
    src, bs, seed = numbered(23), 4, 5          # 5 batches an epoch, 3 examples dropped
    got = take(pipeline.train_batches(src, bs, seed=seed, prefetch=prefetch, workers=workers),
               12)                              # into the third epoch
    for step, batch in enumerate(got):
        want = pipeline.train_indices(23, bs, seed, step)
        np.testing.assert_array_equal(batch["label"], want)
        np.testing.assert_array_equal(batch["inputs"][:, 0], want * 10)
    first_epoch = np.concatenate([b["label"] for b in got[:5]])
    assert len(set(first_epoch.tolist())) == 20           # no example twice within an epoch
    assert not np.array_equal(got[0]["label"], got[5]["label"])   # epochs reshuffled


def test_resume_continues_the_same_stream():
    src = numbered(30)
    full = take(pipeline.train_batches(src, 4, seed=2), 15)
    resumed = take(pipeline.train_batches(src, 4, seed=2, start_step=9), 6)
    for a, b in zip(full[9:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = take(pipeline.train_batches(src, 4, seed=3), 1)[0]
    assert not np.array_equal(other["label"], full[0]["label"])


@pytest.mark.parametrize("limit", [None, 7])
def test_eval_pass_counts_every_example_once_and_pad_rows_weigh_zero(limit):
    src = numbered(10)
    batches = list(pipeline.eval_batches(src, 4, limit=limit, desc=None))
    n = 10 if limit is None else 7
    assert len(batches) == -(-n // 4)
    labels = np.concatenate([b["label"] for b in batches])
    weight = np.concatenate([b["weight"] for b in batches])
    assert weight.tolist() == [1.0] * n + [0.0] * (4 * len(batches) - n)
    assert labels[weight > 0].tolist() == list(range(n))      # in order, each once
    assert all(b["inputs"].shape == (4, 3) for b in batches)  # the last batch is padded
    assert list(pipeline.eval_batches(src, 4, limit=0)) == []


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="batch size 8 is larger than the training split"):
        pipeline.train_batches(numbered(5), 8, seed=0)
    with pytest.raises(ValueError, match="workers >= 1 to use processes"):
        next(pipeline.train_batches(numbered(5), 2, seed=0, workers=0, processes=True))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(pipeline.eval_batches(numbered(5), 0))


def test_processes_only_for_sources_with_much_left_to_draw():
    st = gen.settings(32, "easy")
    big = GeneratedSource(st, 0, 0, pipeline.PROCESSES_FROM)
    assert pipeline.uses_processes(big, np.arange(len(big)), workers=2)
    assert not pipeline.uses_processes(big, np.arange(len(big)), workers=0)
    assert not pipeline.uses_processes(big, np.arange(10), workers=2)       # little to draw
    assert not pipeline.uses_processes(numbered(5000), np.arange(5000), workers=2)


def test_pickled_generated_source_shares_its_memo():
    """A worker's copy (pickled) draws into the memo the original reads: drawn once for all."""
    st = gen.settings(32, "easy")
    src = GeneratedSource(st, 4, 0, 12)
    first = src.get_batch(np.array([0, 1]))["inputs"]                   # drawn before sharing
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy.get_batch(np.array([0, 1]))["inputs"], first)
    assert src.pending(np.arange(12)) == 10
    drawn = copy.get_batch(np.array([5, 7, 9]))["inputs"]                # drawn in the copy
    assert src.pending(np.array([5, 7, 9])) == 0 and src.pending(np.arange(12)) == 7
    np.testing.assert_array_equal(src.get_batch(np.array([5, 7, 9]))["inputs"], drawn)
    fresh = GeneratedSource(st, 4, 0, 12, memoize=False)
    np.testing.assert_array_equal(fresh.get_batch(np.array([5, 7, 9]))["inputs"], drawn)


def test_sources_pickled_from_two_threads_share_one_memo(monkeypatch):
    """grain pickles the dataset for its workers from several threads: all copies get one file
    (two files would leave a worker's images out of the memo the others read)."""
    import tempfile
    import threading

    make = tempfile.mkdtemp

    def slow_mkdtemp(*args, **kwargs):          # widens the window the race needs
        time.sleep(0.05)
        return make(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", slow_mkdtemp)
    src = GeneratedSource(gen.settings(32, "easy"), 1, 0, 8)
    copies = []
    threads = [threading.Thread(target=lambda: copies.append(pickle.loads(pickle.dumps(src))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(copies) == 3 and {c._shared for c in copies} == {src._shared}
    copies[0].get_batch(np.array([1, 2]))
    assert src.pending(np.arange(8)) == 6


def test_worker_processes_give_the_batches_of_threads():
    """grain's spawned workers draw generated Pathfinder batches: same batches, same order."""
    st = gen.settings(32, "easy")
    src = GeneratedSource(st, 1, 0, 40)
    got = take(pipeline.train_batches(src, 8, seed=3, workers=2, processes=True), 7)
    ref = GeneratedSource(st, 1, 0, 40)
    for step, batch in enumerate(got):
        want = pipeline.TrainBatch(ref, 8, 3)(step)
        assert set(batch) == set(want)
        for k in want:
            np.testing.assert_array_equal(batch[k], want[k])
    # every image a worker drew is in this process's memo (one shared file)
    assert src.pending(np.arange(40)) == 0


class Drawn(ArraySource):
    """A numbered source that counts as 'generated': examples are pending until made, and
    every make/get_batch call is recorded."""

    def __init__(self, n):
        base = numbered(n)
        super().__init__(base.inputs, base.mask, base.label)
        self.made, self.calls = np.zeros(n, bool), []

    def pending(self, indices):
        return int((~self.made[np.asarray(indices)]).sum())

    def make(self, indices):
        self.calls.append(("make", len(indices)))
        self.made[np.asarray(indices)] = True

    def get_batch(self, indices):
        self.calls.append(("get", self.pending(indices)))
        self.made[np.asarray(indices)] = True
        return super().get_batch(indices)


@pytest.mark.parametrize("batches", ["train", "eval"])
def test_unmade_examples_are_made_a_group_of_batches_at_a_time(batches):
    src, bs = Drawn(400), 8                           # draw_ahead(8) == 8 batches of 8
    if batches == "train":
        got = take(pipeline.train_batches(src, bs, seed=1, prefetch=0), 24)
        want = [pipeline.train_indices(400, bs, 1, s) for s in range(24)]
    else:
        got = list(pipeline.eval_batches(src, bs, limit=190, prefetch=0, desc=None))
        want = [np.minimum(np.arange(b * bs, (b + 1) * bs), 189) for b in range(24)]
    for batch, idx in zip(got, want):                 # the same batches as without grouping
        np.testing.assert_array_equal(batch["label"], idx)
    makes = [n for kind, n in src.calls if kind == "make"]
    assert makes == [8 * bs] * 3                      # one call per 8 batches
    assert all(n == 0 for kind, n in src.calls if kind == "get")   # each batch found made
