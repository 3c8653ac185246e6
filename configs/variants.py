"""Per-variant hyperparameters for the LRA tasks, in one place.

The registry (attention/) holds each variant's generic defaults; this table holds what the
LRA setups use per task, where they differ. `for_task(variant, task)` -> overrides dict.
`shrink_for_length` scales length-bound hyperparameters down for the `tiny` configs, so a tiny
run still exercises the sparse structure instead of degenerating to dense.
"""

from __future__ import annotations

# variant -> {task or "*": {hyperparameter: value}}. "*" applies to every task; a task entry
# wins over "*".
# Fixed patterns (attention part 1).
FIXED_PATTERN_HPARAMS: dict[str, dict[str, dict]] = {
}

# Clustering, learned patterns, low rank, kernels, synthesizer, inducing (attention part 2).
LEARNED_HPARAMS: dict[str, dict[str, dict]] = {
}

# For tiny configs: hyperparameter -> value used when max_len is small (<= 128).
TINY_HPARAMS: dict[str, object] = {
}


def for_task(variant: str, task: str) -> dict:
    table = {**FIXED_PATTERN_HPARAMS, **LEARNED_HPARAMS}.get(variant, {})
    return {**table.get("*", {}), **table.get(task, {})}


def shrink_for_length(attention_config, max_len: int) -> None:
    """In place: replace length-bound hyperparameters by the TINY_HPARAMS values."""
    if max_len > 128:
        return
    for key, value in TINY_HPARAMS.items():
        if key in attention_config:
            attention_config[key] = value
