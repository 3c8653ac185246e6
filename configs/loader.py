"""Load a config the way train.py does, from a 'configs/<task>.py:<arg>' spec, for tools/tests.

    c = load("configs/listops.py:performer,tiny", {"train.steps": 10})
"""

from __future__ import annotations

import importlib
import os


def load(spec: str, overrides: dict | None = None):
    path, _, arg = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    if not os.path.exists(path) and not os.path.exists(os.path.join("configs", name + ".py")):
        raise ValueError(f"config file {path!r} not found; expected configs/<task>.py[:arg]")
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(arg or None)
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"config has no field {key!r}")
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    return config
