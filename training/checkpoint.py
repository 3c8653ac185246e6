"""Checkpoints behind one small interface (orbax), so an orbax API change touches this file.

A checkpoint holds the training state pytree (model params and buffers, optimizer state) and a
JSON meta dict (step, data position, config). Saving is synchronous and atomic (orbax writes to
a temporary directory and renames), so an interrupted save never leaves a half checkpoint.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """-> (state, meta). abstract_state: the state's tree of jax.ShapeDtypeStruct."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.close()
