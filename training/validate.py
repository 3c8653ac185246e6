"""Every config value's valid range, in one place, checked before anything runs.

`validate_config(config)` raises ConfigError (a ValueError) naming the field, its value and the
valid range. The loop calls it before it builds anything or touches the workdir; what only the
built pieces can check (a variant's hyperparameters, a task's files) is checked by tracing the
train step once, also before the workdir is touched (training/loop.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from models.settings import CHOICES as MODEL_CHOICES


class ConfigError(ValueError):
    """A config value outside its valid range."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    """An integer in [lo, hi]."""
    text = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return lambda v: None if _is_int(v) and v >= lo and (hi is None or v <= hi) else text


def number(lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False):
    """A finite number in the interval (open ends as marked)."""
    left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    text = f"a finite number in {left}{lo}, {hi}{right}"

    def check(v):
        if not _is_num(v):
            return text
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        return None if ok_lo and ok_hi else text
    return check


def choice(*values) -> Callable[[Any], str | None]:
    return lambda v: None if v in values else f"one of {list(values)}"


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


RATE = number(0.0, 1.0, hi_open=True)     # dropout, Adam betas: [0, 1)

# field -> check. A field a task's config does not have is not checked (data.num_train, ...).
RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": integer(0),
    "model.num_layers": integer(1),
    "model.num_heads": integer(1),
    "model.emb_dim": integer(1),
    "model.qkv_dim": integer(1),
    "model.mlp_dim": integer(1),
    "model.dropout_rate": RATE,
    "model.attention_dropout_rate": RATE,
    **{f"model.{field}": choice(*valid) for field, valid in MODEL_CHOICES.items()},
    "model.remat": boolean,
    "model.reversible": boolean,
    "model.ffn_chunks": integer(1),
    "model.num_global_tokens": integer(0),
    "model.relative_labels": boolean,
    "model.relative_max_distance": integer(1),
    "model.cmem_len": integer(0),
    "model.compression_rate": integer(1),
    "model.segment_len": integer(0),
    "model.mem_len": integer(0),
    "model.recon_weight": number(0.0),
    "attention.impl": choice("xla", "pallas", "auto"),
    "data.max_len": integer(1),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1),
    "data.workers": integer(0),
    "data.num_train": integer(1),
    "data.num_val": integer(1),
    "data.num_test": integer(1),
    "data.min_length": integer(1),
    "data.max_length": integer(2),
    "data.gen_seed": integer(0),
    "data.resolution": choice(32, 64, 128, 256),
    "data.difficulty": choice("easy", "intermediate", "hard"),
    "data.val_fraction": number(0.0, 1.0, lo_open=True, hi_open=True),
    "data.memoize": boolean,
    "data.val_from_train": boolean,
    "train.steps": integer(1),
    "train.learning_rate": number(0.0, lo_open=True),
    "train.schedule": choice("rsqrt", "cosine", "constant"),
    "train.warmup_steps": integer(0),
    "train.weight_decay": number(0.0),
    "train.b1": RATE,
    "train.b2": RATE,
    "train.eps": number(0.0, lo_open=True),
    "train.grad_clip": number(0.0),
    "train.log_every": integer(1),
    "train.eval_every": integer(1),
    "train.eval_examples": integer(0),
    "train.checkpoint_every": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.distributed": boolean,
    "train.change_on_resume": boolean,
    "train.seq_shards": integer(1),
    "train.num_processes": integer(0),
    "train.process_id": integer(-1),
    "train.objective": choice("classify", "denoise", "causal_lm"),
    "train.mask_rate": number(0.0, 1.0, lo_open=True),
    "train.init_from": lambda v: None if isinstance(v, str) else "a workdir path (str) or ''",
    "data.validation_fraction": number(0.0, 1.0, lo_open=True, hi_open=True),
    "data.test_fraction": number(0.0, 1.0, lo_open=True, hi_open=True),
    "data.train_bytes": integer(0),
    "data.eval_bytes": integer(0),
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def validate_config(config) -> None:
    """ConfigError on the first value outside its range (all problems listed)."""
    problems = []
    for field, check in RULES.items():
        value = _get(config, field)
        if value is _MISSING:
            continue
        valid = check(value)
        if valid is not None:
            problems.append(f"{field}={value!r} (valid: {valid})")
    problems += _relations(config)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _xl_relations(config) -> list[str]:
    """model.recurrence="xl" | "compressive": the XL encoder's own rules
    (models/recurrent.py: xl_problems, the one source) and what the loop adds."""
    from models.recurrent import xl_problems

    name = _get(config, "attention.name")
    out = xl_problems(config.model, None if name is _MISSING else name)
    if _get(config, "train.seq_shards") not in (_MISSING, 1):
        out.append("model.recurrence='xl' does not support train.seq_shards > 1")
    return out


def _relations(config) -> list[str]:
    """Constraints between fields (checked only when each field alone is valid)."""
    out = []
    m = config.model
    if _is_int(m.qkv_dim) and _is_int(m.num_heads) and m.num_heads > 0 \
            and m.qkv_dim % m.num_heads:
        out.append(f"model.qkv_dim={m.qkv_dim} must be divisible by model.num_heads="
                   f"{m.num_heads}")
    if m.get("remat") is True and m.get("reversible") is True:
        out.append("model.remat=True with model.reversible=True: reversible layers already "
                    "recompute in the backward pass; set one of them")
    if m.get("recurrence") in ("xl", "compressive"):
        out += _xl_relations(config)
    g, name = m.get("num_global_tokens"), _get(config, "attention.name")
    if _is_int(g) and g > 0 and name is not _MISSING and name not in ("longformer",):
        out.append(f"model.num_global_tokens={g} (ETC global tokens) needs attention.name="
                   f"'longformer' (global positions the model sets); got {name!r}")
    if m.get("relative_labels") is True and _is_int(g) and g == 0:
        out.append("model.relative_labels=True (ETC relative position labels) needs "
                   "model.num_global_tokens > 0")
    lo, hi = _get(config, "data.min_length"), _get(config, "data.max_length")
    if _is_int(lo) and _is_int(hi) and lo >= hi:
        out.append(f"data.min_length={lo} must be < data.max_length={hi}")
    return out
