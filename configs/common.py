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

    c.model = ml_collections.ConfigDict()
    c.model.num_layers = 4           # encoder blocks
    c.model.num_heads = 8
    c.model.emb_dim = 512            # token embedding / residual width
    c.model.qkv_dim = 512            # total width of q, k, v over all heads
    c.model.mlp_dim = 1024           # block MLP hidden width and classifier hidden width
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.model.pooling = "cls"          # "cls" (learned CLS vector prepended) | "mean" (real tokens)
    c.model.pos_embedding = "sinusoidal"   # "sinusoidal" | "learned" | "sinusoidal2d" (grids)
    c.model.interaction = "nli"      # pair tasks: [u, v, u*v, u-v] -> MLP ("concat": [u, v])
    c.model.dtype = "float32"        # activations: "float32" | "bfloat16"
    # Memory savings (models/encoder.py): jax.checkpoint per block; Reformer's reversible
    # residual layers (no activations stored per layer); feed-forward in chunks of the length.
    c.model.remat = False
    c.model.reversible = False
    c.model.ffn_chunks = 1           # 1 = whole length at once
    # ETC global tokens: learned tokens after CLS that attend to and are seen by every token
    # (attention 'longformer': its num_global is set to the prefix; long tokens: window).
    c.model.num_global_tokens = 0
    # Segment-level recurrence (models/recurrent.py): "none" | "xl" (Transformer-XL: segments
    # of segment_len tokens, each layer attends over [mem_len cached states; segment] with
    # relative positions; dense attention, mean pooling).
    c.model.recurrence = "none"
    c.model.segment_len = 0          # xl: tokens per segment (>= 1)
    c.model.mem_len = 0              # xl: cached states per layer (0 = segments independent)
    # "compressive" (Compressive Transformer): XL plus a compressed memory of cmem_len slots per
    # layer; the states leaving the memory are mean-pooled in groups of compression_rate.
    c.model.cmem_len = 0
    c.model.compression_rate = 2
    c.model.compression = "mean"     # the only compression function implemented

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
