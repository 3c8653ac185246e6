"""train.init_from=DIR: start a run from a pretraining run's encoder (self-pretraining, then
fine-tuning; Amos et al., ICLR 2024).

DIR is the pretraining run's workdir. Its config.json says what it trained; its newest good
checkpoint (verified like a resume: checksums, finite values) is read, and every array of its
encoder (embeddings, positions, blocks with their attention variant's params and buffers, final
LayerNorm) is copied into the new model's encoder. The new run's head (classifier, or a fresh
token head) keeps its own initialisation, as does the optimizer: only weights carry over.

Refused with a ValueError naming what differs: a different attention variant or variant
hyperparameters, a different encoder shape (layers, heads, widths, pooling, positions, max_len),
or arrays whose shapes differ. DIR without config.json or without a good checkpoint is an error
that says so.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

# Config fields that fix the encoder's arrays; they must agree between pretraining and the run.
ENCODER_FIELDS = ("model.num_layers", "model.num_heads", "model.emb_dim", "model.qkv_dim",
                  "model.mlp_dim", "model.pooling", "model.pos_embedding", "model.dtype",
                  "data.max_len")


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise ValueError(f"train.init_from={directory!r}: no such directory (give the workdir "
                         f"of a finished or running pretraining run)")
    if not os.path.exists(path):
        raise ValueError(f"train.init_from={directory!r} has no config.json: it is not a "
                         f"training workdir (train.py writes config.json there)")
    with open(path) as f:
        return json.load(f)


def config_differences(pre: dict, new: dict) -> list[str]:
    """What differs between the pretraining config and this run's, for the encoder."""
    out = []
    pre_att, new_att = pre.get("attention", {}), new.get("attention", {})
    if pre_att.get("name") != new_att.get("name"):
        out.append(f"attention variant: pretrained {pre_att.get('name')!r}, this run "
                   f"{new_att.get('name')!r}")
    else:
        for key in sorted(set(pre_att) | set(new_att)):
            if key in ("name", "impl"):
                continue
            if pre_att.get(key, "<absent>") != new_att.get(key, "<absent>"):
                out.append(f"attention.{key}: pretrained {pre_att.get(key, '<absent>')!r}, "
                           f"this run {new_att.get(key, '<absent>')!r}")
    for field in ENCODER_FIELDS:
        a, b = _get(pre, field), _get(new, field)
        if a != b:
            out.append(f"{field}: pretrained {a!r}, this run {b!r}")
    return out


def _flat_shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_run_state(pre_config, *, task, build_state):
    """The pretraining run's saved state as a tree of ShapeDtypeStruct (nothing allocated).
    build_state(config, task) -> the (model, optimizer) state the loop checkpoints."""
    return jax.eval_shape(lambda: nnx.to_pure_dict(build_state(pre_config, task)))


def load_pretrained(model, directory: str, config, *, task, build_state) -> dict:
    """Copies the encoder of the pretraining run in `directory` into model.encoder (in place).
    -> provenance dict (directory, step, objective, number of arrays) for results.json."""
    from training.checkpoint import Checkpoints

    directory = os.path.abspath(directory)
    pre = read_config(directory)
    new = json.loads(config.to_json())
    diff = config_differences(pre, new)
    if diff:
        raise ValueError(
            f"train.init_from={directory!r}: the pretraining run's encoder does not fit this "
            f"run: " + "; ".join(diff))
    if not hasattr(model, "encoder"):
        raise ValueError("train.init_from: this model has no encoder to load into")
    pre_config = ml_collections.ConfigDict(pre)
    abstract = abstract_run_state(pre_config, task=task, build_state=build_state)
    ckpt = Checkpoints(os.path.join(directory, "checkpoints"), keep=10**6)
    try:
        restored = ckpt.restore_latest_good(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"train.init_from={directory!r} has no checkpoint yet "
                         f"({os.path.join(directory, 'checkpoints')} is empty)")
    pre_encoder = restored.state[0]["encoder"]
    target = nnx.state(model.encoder)
    want = _flat_shapes(nnx.to_pure_dict(target))
    have = _flat_shapes(pre_encoder)
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if bad:
        shown = "; ".join(f"encoder{k}: pretrained {have.get(k, 'absent')}, this run "
                          f"{want.get(k, 'absent')}" for k in bad[:6])
        raise ValueError(f"train.init_from={directory!r}: encoder arrays differ in shape "
                         f"({len(bad)}): {shown}")
    nnx.replace_by_pure_dict(target, jax.tree.map(np.asarray, pre_encoder))
    nnx.update(model.encoder, target)
    return {"init_from": directory, "init_step": int(restored.step),
            "init_objective": _get(pre, "train.objective") if _get(pre, "train.objective")
            != "<absent>" else "classify",
            "init_task": _get(pre, "data.task"), "init_arrays": len(have)}
