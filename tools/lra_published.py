"""Published Long Range Arena numbers, carried as data (Tay et al., 2020, arXiv 2011.04006).

Source: the LRA paper's Table 1 (test accuracy %, Path-X "FAIL" for every model) and Table 2
(byte-level text classification, batch 32, TPU v3 4x4: steps per second of the Transformer and
speed relative to it, peak memory GB per device), as collected in the LRA paper, Tay et al. 2020, arXiv 2011.04006.
Entries the paper marks uncertain keep a note instead of a number.
"""

from __future__ import annotations

SOURCE = "Tay et al. 2020, Long Range Arena (arXiv 2011.04006), Tables 1 and 2"

# LRA column name -> our task name.
TASK_COLUMNS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval",
                "image": "Image", "pathfinder": "Path", "pathx": "Path-X"}

# Table 1: model -> {task: accuracy %}; "avg" is the paper's average over the five tasks.
TABLE1 = {
    "Transformer": {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44,
                    "pathfinder": 71.40, "avg": 54.39},
    "Local Att": {"listops": 15.82, "text": 52.98, "retrieval": 53.39, "image": 41.46,
                  "pathfinder": 66.63, "avg": 46.06},
    "Sparse Trans.": {"listops": 17.07, "text": 63.58, "retrieval": 59.59, "image": 44.24,
                      "pathfinder": 71.71, "avg": 51.24},
    "Longformer": {"listops": 35.63, "text": 62.85, "retrieval": 56.89, "image": 42.22,
                   "pathfinder": 69.71, "avg": 53.46},
    "Linformer": {"listops": 35.70, "text": 53.94, "retrieval": 52.27, "image": 38.56,
                  "pathfinder": 76.34, "avg": 51.36},
    "Reformer": {"listops": 37.27, "text": 56.10, "retrieval": 53.40, "image": 38.07,
                 "pathfinder": 68.50, "avg": 50.67},
    "Sinkhorn": {"listops": 33.67, "text": 61.20, "retrieval": 53.83, "image": 41.23,
                 "pathfinder": 67.45, "avg": 51.48},  # the repository README says 51.29
    "Synthesizer": {"listops": 36.99, "text": 61.68, "retrieval": 54.67, "image": 41.61,
                    "pathfinder": 69.45, "avg": 52.88},
    "BigBird": {"listops": 36.05, "text": 64.02, "retrieval": 59.29, "image": 40.83,
                "pathfinder": 74.87, "avg": 55.01},
    "Linear Trans.": {"listops": 16.13, "text": 65.90, "retrieval": 53.09, "image": 42.34,
                      "pathfinder": 75.30, "avg": 50.55},
    "Performer": {"listops": 18.01, "text": 65.40, "retrieval": 53.82, "image": 42.77,
                  "pathfinder": 77.05, "avg": 51.41},
}
PATHX_PUBLISHED = "FAIL"  # every model in Table 1

# Table 2: lengths, the Transformer's steps/s, the others' speed relative to it (x), and peak
# memory GB/device. None = not reported (Longformer and Sparse Transformer were not timed).
TABLE2_LENGTHS = (1024, 2048, 3072, 4096)
TABLE2_TRANSFORMER_STEPS = (8.1, 4.9, 2.3, 1.4)
TABLE2_SPEEDUP = {
    "Transformer": (1.0, 1.0, 1.0, 1.0),
    "Local Att": (1.1, 1.7, 3.2, 5.3),
    "Linformer": (1.2, 1.9, 3.7, 5.5),
    "Reformer": (0.5, 0.4, 0.7, 0.8),
    "Sinkhorn": (1.1, 1.6, 2.9, 3.8),
    "Synthesizer": (1.1, 1.2, None, 1.4),  # 3K entry illegible/doubtful in the paper (2.9x?)
    "BigBird": (0.9, 0.8, 1.2, 1.1),
    "Linear Trans.": (1.1, 1.9, 3.7, 5.6),
    "Performer": (1.2, 1.9, 3.8, 5.7),
}
TABLE2_MEMORY_GB = {
    "Transformer": (0.85, 2.65, 5.51, 9.48),
    "Local Att": (0.42, 0.76, 1.06, 1.37),
    "Linformer": (0.37, 0.55, 0.99, 0.99),
    "Reformer": (0.48, 0.99, 1.53, 2.28),
    "Sinkhorn": (0.47, 0.83, 1.13, 1.48),
    "Synthesizer": (0.65, 1.98, 4.09, 6.99),
    "BigBird": (0.77, 1.49, 2.18, 2.88),
    "Linear Trans.": (0.37, 0.57, 0.80, 1.03),
    "Performer": (0.37, 0.59, 0.82, 1.06),
}

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
