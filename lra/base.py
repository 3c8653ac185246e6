"""The task contract shared by every LRA task, and the task registry.

A task module registers a builder `build(data_config) -> Task` with `@register_task(name)`.
A Task holds random-access sources per split ("train", "validation", "test"), each a `Source`
(below; the shared ones derive from `BatchSource`): `len(source)`, `source.get_batch(indices)`
and `source[i] -> dict` of numpy arrays for one example:

  inputs: int32 [max_len]        token ids (pixel values, bytes, ListOps tokens)
  mask:   bool  [max_len]        True = real token. Padding is a mask, never a token value:
                                 a pixel or byte 0 is a real token.
  label:  int32 []               class index (0 and unused for a causal task: the targets are
                                 the inputs shifted by one)

Pair tasks (retrieval) give inputs/mask of shape [2, max_len]. Sources are deterministic: the
same index gives the same example, so a resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import numpy as np


class Source(Protocol):
    """Everything the pipeline, the loop and the tools use of a split's examples."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Examples `indices` stacked: inputs, mask, label with a leading batch axis."""

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...

    def labels(self) -> np.ndarray:
        """Every example's label, [N] (for the majority baseline)."""

    def pending(self, indices: np.ndarray) -> int:
        """How many of these examples get_batch still has to make (generated data; else 0)."""

    def make(self, indices: np.ndarray) -> None:
        """Makes and keeps these examples ahead of get_batch (generated data drawn in one
        vectorised call is cheaper per example in larger groups); nothing for data in memory."""


class BatchSource:
    """Base of the sources: one example is a batch of one; stored labels in `self.label`;
    nothing to make ahead (pending 0). Subclasses implement get_batch."""

    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.get_batch(np.asarray([index], np.int64)).items()}

    def labels(self) -> np.ndarray:
        return np.asarray(self.label)

    def pending(self, indices) -> int:
        return 0

    def make(self, indices) -> None:
        return None


@dataclasses.dataclass
class ArraySource(BatchSource):
    """A source over preloaded arrays (inputs [N, ...], mask [N, ...], label [N])."""

    inputs: np.ndarray
    mask: np.ndarray
    label: np.ndarray

    def __post_init__(self):
        n = len(self.label)
        if len(self.inputs) != n or len(self.mask) != n:
            raise ValueError(
                f"ArraySource: inputs ({len(self.inputs)}), mask ({len(self.mask)}) and "
                f"label ({n}) differ in length")

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"inputs": self.inputs[indices], "mask": self.mask[indices],
                "label": self.label[indices]}


class PixelSource(BatchSource):
    """Images as uint8 [N, pixels] (in memory or memory-mapped) with labels; batches come out as
    int32 pixel values with an all-True mask (image, Pathfinder release data)."""

    def __init__(self, pixels, labels):
        if len(pixels) != len(labels):
            raise ValueError(f"PixelSource: {len(pixels)} images but {len(labels)} labels")
        self.pixels, self.label = pixels, np.asarray(labels, np.int32)

    def get_batch(self, indices):
        indices = np.asarray(indices, np.int64)
        pixels = np.asarray(self.pixels[indices])
        return {"inputs": pixels.astype(np.int32), "mask": np.ones(pixels.shape, bool),
                "label": self.label[indices]}


class TokenSource(BatchSource):
    """Padded token ids [N, ..., max_len] (uint8, possibly memory-mapped) with their lengths
    [N, ...]; batches come out as int32 with mask = position < length. ListOps stores one
    sequence per example, retrieval two ([N, 2, max_len])."""

    def __init__(self, tokens, lengths, labels):
        if not len(tokens) == len(lengths) == len(labels):
            raise ValueError(f"TokenSource: {len(tokens)} sequences, {len(lengths)} lengths and "
                             f"{len(labels)} labels differ")
        self.tokens, self.lengths = tokens, np.asarray(lengths)
        self.label = np.asarray(labels, np.int32)
        self._positions = np.arange(tokens.shape[-1])

    def get_batch(self, indices):
        indices = np.asarray(indices, np.int64)
        mask = self._positions < self.lengths[indices][..., None]
        return {"inputs": np.asarray(self.tokens[indices]).astype(np.int32), "mask": mask,
                "label": self.label[indices]}


class SubsetSource(BatchSource):
    """A source restricted to `indices` of another (e.g. a validation split carved from train)."""

    def __init__(self, source: Source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        return self.source.get_batch(self.indices[np.asarray(indices, np.int64)])

    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels())[self.indices]

    def pending(self, indices) -> int:
        return self.source.pending(self.indices[np.asarray(indices, np.int64)])

    def make(self, indices) -> None:
        self.source.make(self.indices[np.asarray(indices, np.int64)])


@dataclasses.dataclass
class Task:
    """What the training loop needs to know of a task."""

    name: str
    splits: Mapping[str, Source]           # "train", "validation", "test"
    num_classes: int
    vocab_size: int                        # token ids are in [0, vocab_size)
    max_len: int
    pair: bool = False                     # two sequences per example (retrieval)
    grid_shape: tuple[int, int] | None = None   # (rows, cols) for image-like tasks
    causal: bool = False                   # a language-modelling task (next-token targets)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # provenance, counts

    def majority_rate(self, split: str) -> float:
        """Accuracy of always predicting the most frequent label of `split`."""
        labels = np.asarray(self.splits[split].labels())
        return float(np.bincount(labels, minlength=self.num_classes).max() / max(len(labels), 1))


TASKS: dict[str, Callable[..., Task]] = {}   # the one task registry: name -> build


def register_task(name: str):
    """Decorator: registers build(data_config) -> Task under `name`."""
    def deco(build):
        if name in TASKS and build.__module__ == "__main__":
            return build    # `python -m lra.<task>`: the package registered the module already
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        TASKS[name] = build
        return build
    return deco


def get_task(data_config) -> Task:
    """Builds the task named by data_config.task; ValueError listing valid names otherwise."""
    name = data_config.task
    if name not in TASKS:
        raise ValueError(
            f"Unrecognized task: {name!r}. Valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](data_config)
