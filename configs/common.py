"""Pieces every task config shares: the config tree, the `arg` parser, the tiny shrink.

A task file's get_config(arg) reads `arg` as comma-separated options, big_vision style:
    "performer"                variant name (any registered attention variant)
    "local,tiny"               variant + the tiny shrink (trains in seconds on a CPU)
    "linformer,len=4000"       key=value options the task file understands
The first option that names a registered variant picks it (default: dense).
"""

from __future__ import annotations

import ml_collections

import attention
from configs import variants as variant_table
from models.settings import ModelSettings


def parse_arg(arg: str | None, known_flags=("tiny", "small"), known_keys=()):
    """-> (variant name, set of flags, dict of key=value). ValueError on anything unknown."""
    variant, flags, keys = "dense", set(), {}
    for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in known_keys:
                raise ValueError(
                    f"config option {part!r}: unknown key {key!r}; valid keys: "
                    f"{', '.join(known_keys) or 'none'}")
            keys[key] = value
        elif part in known_flags:
            flags.add(part)
        elif part in attention.VARIANTS:
            variant = part
        else:
            raise ValueError(
                f"config option {part!r} is neither a flag ({', '.join(known_flags)}) nor an "
                f"attention variant. Valid variants: {', '.join(attention.names())}")
    return variant, flags, keys


def base_config(task: str, variant: str) -> ml_collections.ConfigDict:
    """The shared tree. Its values are LRA's ListOps Transformer setup (the LRA repo's listops
    base config); each task file changes only what its published setup changes, with a comment."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # every model field, its default and its choices: models/settings.py (the LRA ListOps setup)
    c.model = ml_collections.ConfigDict(ModelSettings().as_dict())

    c.attention = attention_config(variant, task)

    c.data = ml_collections.ConfigDict()
    c.data.task = task
    c.data.data_dir = ""             # released files / tfds dir; "" = the task's default
    c.data.cache_dir = "data_cache"  # generated data lands here
    c.data.max_len = 2000
    c.data.batch_size = 32           # global batch, split over all devices
    c.data.eval_batch_size = 64
    c.data.workers = 2               # prefetch threads

    c.train = ml_collections.ConfigDict()
    c.train.steps = 5000
    c.train.learning_rate = 0.05
    c.train.schedule = "rsqrt"       # "rsqrt" (linear warmup, then rsqrt decay) | "cosine" | "constant"
    c.train.warmup_steps = 1000
    c.train.weight_decay = 0.1       # decoupled (AdamW)
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.eps = 1e-9
    c.train.grad_clip = 0.0          # global-norm clip; 0 = off
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.eval_examples = 0        # examples per validation pass during training; 0 = all
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.distributed = False      # call jax.distributed.initialize() (multi-host, docs)
    c.train.coordinator_address = ""  # distributed: "host:port" of process 0 ("" = detect)
    c.train.num_processes = 0        # distributed: number of processes (0 = detect)
    c.train.process_id = -1          # distributed: this process's id (-1 = detect)
    c.train.seq_shards = 1           # devices one sequence is split over (context parallelism)
    c.train.change_on_resume = False  # resume with a changed learning_rate/schedule/warmup/clip
    # What is trained (training/objectives.py): "classify" (a label per example), "denoise"
    # (self-pretraining, Amos et al. ICLR 2024: masked-token prediction on the task's own
    # inputs, bidirectional; pair tasks: both sides), "causal_lm" (next-token prediction with
    # causal attention; the lm task's objective).
    c.train.objective = "classify"
    c.train.mask_rate = 0.5          # denoise: share of real tokens hidden (Amos et al.: 50%)
    c.train.init_from = ""           # a pretraining run's workdir: its encoder is loaded, head fresh
    return c


def attention_config(variant: str, task: str) -> ml_collections.ConfigDict:
    """name, impl and every hyperparameter of the variant (so each can be overridden)."""
    hp = attention.hparams_for(variant, variant_table.for_task(variant, task))
    c = ml_collections.ConfigDict()
    c.name = variant
    c.impl = "auto"                  # "xla" | "pallas" | "auto" (pallas on a GPU where a kernel exists)
    for key, value in hp.items():
        c[key] = value
    return c


def epochs_cosine(c: ml_collections.ConfigDict, train_examples: int, *, epochs: int,
                  learning_rate: float):
    """LRA's image/pathfinder schedule at data.batch_size: `epochs` epochs, one epoch of linear
    warmup then cosine decay, no weight decay, evaluation and checkpoint once an epoch."""
    per_epoch = train_examples // c.data.batch_size
    c.train.update(steps=epochs * per_epoch, learning_rate=learning_rate, schedule="cosine",
                   warmup_steps=per_epoch, weight_decay=0.0, eval_every=per_epoch,
                   checkpoint_every=per_epoch)


def shrink_tiny(c: ml_collections.ConfigDict, *, max_len: int = 64):
    """The `tiny` option: a model and run that train in seconds on a CPU (used by tests)."""
    c.model.update(num_layers=1, num_heads=2, emb_dim=32, qkv_dim=32, mlp_dim=64)
    c.data.update(max_len=max_len, batch_size=8, eval_batch_size=16)
    c.train.update(steps=20, warmup_steps=5, log_every=5, eval_every=10, checkpoint_every=10,
                   eval_examples=64)
    variant_table.shrink_for_length(c.attention, max_len)
    return c
