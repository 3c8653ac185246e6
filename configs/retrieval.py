"""Retrieval (LRA): AAN citation pairs, byte-level, dual encoder; the published Transformer setup
of the LRA repository's matching base config.

    python train.py --config=configs/retrieval.py:dense --workdir=runs/retrieval_dense \\
        --config.data.data_dir=DIR          # DIR holds new_aan_pairs.{train,eval,test}.tsv
    python train.py --config=configs/retrieval.py:dense,tiny

Published (LRA repo matching base config): 4 layers, 4 heads, emb 128, qkv 128, MLP 512, batch
32, Adam(0.9, 0.98, 1e-9) with weight decay 0.1, lr 0.05 with 8000 linear warmup steps then
rsqrt decay, 5000 steps (so warmup never finishes: kept as published), max_len 4000 bytes per
document, CLS pooling, one shared encoder and [u, v, u*v, u-v] -> MLP (interaction "nli").
Deviations: bytes are ids 0-255 with padding marked by the mask; weight decay is decoupled
(optax.adamw). LRA's code at HEAD builds a single encoder for this task and crashes (issue #42);
here the model factory builds the dual encoder for Task.pair.
"""

from configs import common


def get_config(arg=None):
    variant, flags, keys = common.parse_arg(arg, known_flags=("tiny",), known_keys=("len",))
    c = common.base_config("retrieval", variant)
    c.model.update(num_heads=4, emb_dim=128, qkv_dim=128, mlp_dim=512)  # LRA matching model
    c.model.interaction = "nli"                   # [u, v, u*v, u-v] -> MLP
    c.data.max_len = int(keys.get("len", 4000))   # bytes per document (truncated)
    c.data.data_dir = ""                          # "" = data/lra_release (see docs/tasks.md)
    c.train.warmup_steps = 8000                   # longer than the 5,000 steps: as published
    if "tiny" in flags:
        common.shrink_tiny(c, max_len=64)
    return c
