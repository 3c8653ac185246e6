"""Published Long Range Arena numbers, carried as data (Tay et al., 2020, arXiv 2011.04006).

Source: the LRA paper's Table 1 (test accuracy %, Path-X "FAIL" for every model) and Table 2
(byte-level text classification, batch 32, TPU v3 4x4: steps per second of the Transformer and
speed relative to it, peak memory GB per device), as collected in the LRA paper, Tay et al. 2020, arXiv 2011.04006.
Entries the paper marks uncertain keep a note instead of a number.
"""

from __future__ import annotations

import json
import os

SOURCE = "Tay et al. 2020, Long Range Arena (arXiv 2011.04006), Tables 1 and 2"

# LRA column name -> our task name.
TASK_COLUMNS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval",
                "image": "Image", "pathfinder": "Path", "pathx": "Path-X"}

# The tables themselves: tools/lra_published.json (data, with the notes on doubtful entries).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lra_published.json")) as _f:
    _DATA = json.load(_f)

# Table 1: model -> {task: accuracy %}; "avg" is the paper's average over the five tasks.
TABLE1 = _DATA["table1_accuracy"]
PATHX_PUBLISHED = "FAIL"  # every model in Table 1

# Table 2: lengths, the Transformer's steps/s, the others' speed relative to it (x), and peak
# memory GB/device. None = not reported (Longformer and Sparse Transformer were not timed).
TABLE2_LENGTHS = tuple(_DATA["table2_lengths"])
TABLE2_TRANSFORMER_STEPS = tuple(_DATA["table2_transformer_steps_per_s"])
TABLE2_SPEEDUP = {k: tuple(v) for k, v in _DATA["table2_speedup"].items()}
TABLE2_MEMORY_GB = {k: tuple(v) for k, v in _DATA["table2_memory_gb"].items()}

# Our registry names that correspond to an LRA model (a name absent from the registry is
# simply not matched; the registry is never assumed to hold these).
ALIASES = {
    "Transformer": ("dense",),
    "Local Att": ("local",),
    "Sparse Trans.": ("sparse", "sparse_fixed", "strided"),
    "Longformer": ("longformer",),
    "Linformer": ("linformer",),
    "Reformer": ("reformer", "lsh"),
    "Sinkhorn": ("sinkhorn",),
    "Synthesizer": ("synthesizer", "synthesizer_dense", "synthesizer_random"),
    "BigBird": ("bigbird",),
    "Linear Trans.": ("linear", "linear_transformer", "elu"),
    "Performer": ("performer", "favor"),
}


def lra_model_for(variant: str) -> str | None:
    """The LRA Table 1 model our variant `variant` corresponds to, or None."""
    for model, names in ALIASES.items():
        if variant in names:
            return model
    return None
