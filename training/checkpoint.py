"""Checkpoints behind one small interface (orbax), so an orbax API change touches this file.

A checkpoint holds the training state pytree (model params and buffers, optimizer state) and a
JSON meta dict (step, data position, config, and a SHA-256 checksum of every array). Saving is
synchronous and atomic (orbax writes a temporary folder and renames it), so an interrupted save
leaves no half checkpoint, only a temporary folder that the next start removes.

Restoring verifies: a checkpoint that cannot be read, lacks a part, fails its checksums or holds
a non-finite array is reported and skipped, and the newest good one is restored. The damaged
ones are moved to `<directory>_damaged/` (kept, never deleted) once the run is known to go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir could be restored."""


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        x = x.addressable_data(0)  # the state is replicated: one copy holds every value
    return np.asarray(x)


def state_checksums(state) -> dict[str, str]:
    """{array path: sha256 of dtype, shape and bytes} for every array of the state."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = np.ascontiguousarray(_host(leaf))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def _problems(state, meta) -> str | None:
    """What is wrong with a restored checkpoint, or None."""
    if not isinstance(meta, dict) or "data_position" not in meta:
        return "its meta file lacks the data position"
    expected = meta.get("checksums")
    if expected is None:
        return "its meta file has no checksums"
    found = state_checksums(state)
    bad = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if bad:
        return f"checksum mismatch in {len(bad)} array(s), e.g. {bad[0]}"
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = _host(leaf)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"non-finite values in {jax.tree_util.keystr(path)}"
    return None


def _unreadable(part: str, e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"its {part} is unreadable ({type(e).__name__}: {text})"


@dataclasses.dataclass
class Restored:
    step: int
    state: object
    meta: dict
    damaged: list[tuple[int, str, str]]     # (step, path, what is wrong), newest first


class Checkpoints:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.keep = max(1, keep)
        self.removed_tmp = self._remove_stale_tmp()
        self.manager = self._manager()

    def _manager(self):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"))

    def _remove_stale_tmp(self) -> list[str]:
        """Temporary folders of saves that never finished (a kill during a save)."""
        if not os.path.isdir(self.directory) or jax.process_index() != 0:
            return []
        stale = sorted(n for n in os.listdir(self.directory) if TMP_MARK in n)
        for name in stale:
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        return stale

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, meta: dict) -> None:
        meta = {**meta, "checksums": state_checksums(state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """-> (state, meta) of one step, unverified. abstract_state: tree of ShapeDtypeStruct."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest_good(self, abstract_state, check_meta=None) -> Restored | None:
        """The newest checkpoint that reads and verifies; None if there is none at all.
        check_meta(meta) runs on each candidate's meta before its arrays are read: what it raises
        (e.g. the run's identity differs) propagates. CheckpointError if there are checkpoints
        but none is good."""
        damaged = []
        for step in reversed(self.steps()):
            problem, state, meta = self._try_restore(step, abstract_state, check_meta)
            if problem is None:
                return Restored(step, state, meta, damaged)
            damaged.append((step, self.path(step), problem))
        if damaged:
            listing = "; ".join(f"{p}: {why}" for _, p, why in damaged)
            raise CheckpointError(
                f"no good checkpoint in {self.directory} ({listing}). Nothing was changed. To "
                f"start fresh, use a new --workdir (or move {self.directory} away).")
        return None

    def _try_restore(self, step, abstract_state, check_meta):
        """-> (problem or None, state, meta)."""
        try:
            meta = self.restore_meta(step)
        except Exception as e:  # empty or missing meta file
            return _unreadable("meta", e), None, None
        if not isinstance(meta, dict) or "config" not in meta:
            return "its meta file lacks the run's config", None, None
        if check_meta is not None:
            check_meta(meta)
        try:
            state, meta = self.restore(step, abstract_state)
        except Exception as e:  # missing state, truncated or undecodable chunk
            return _unreadable("state", e), None, None
        return _problems(state, meta), state, meta

    def set_aside(self, steps) -> list[str]:
        """Moves damaged steps to <directory>_damaged/<step>-<time>/; returns the new paths."""
        moved = []
        for step in steps:
            dest = os.path.join(self.directory + "_damaged", f"{step}-{int(time.time())}")
            if jax.process_index() == 0:  # multi-process runs: one process moves
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(self.path(step), dest)
            moved.append(dest)
        if moved and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("checkpoints set aside")
        if moved:
            self.manager.close()
            self.manager = self._manager()
        return moved

    def close(self):
        self.manager.close()
