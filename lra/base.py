"""The task contract shared by every LRA task, and the task registry.

A task module registers a builder `build(data_config) -> Task` with `@register_task(name)`.
A Task holds random-access sources per split ("train", "validation", "test"). A source has
`len(source)` and `source[i] -> dict` of numpy arrays for one example:

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
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class ArraySource:
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

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"inputs": self.inputs[index], "mask": self.mask[index],
                "label": self.label[index]}

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised gather (fast path used by the batcher)."""
        return {"inputs": self.inputs[indices], "mask": self.mask[indices],
                "label": self.label[indices]}


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
        src = self.splits[split]
        labels = _labels(src)
        return float(np.bincount(labels, minlength=self.num_classes).max() / max(len(labels), 1))


def _labels(src) -> np.ndarray:
    if isinstance(src, ArraySource):
        return np.asarray(src.label)
    if hasattr(src, "labels"):
        return np.asarray(src.labels())
    return np.asarray([int(src[i]["label"]) for i in range(len(src))])


TASKS: dict[str, Callable[..., Task]] = {}   # the one task registry: name -> build


def register_task(name: str):
    """Decorator: registers build(data_config) -> Task under `name`."""
    def deco(build):
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
