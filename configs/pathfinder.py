"""Pathfinder (LRA): is there a dashed path between the two circles? 32 x 32 pixels, hard.

    python train.py --config=configs/pathfinder.py:dense --workdir=runs/pf32_dense
    python train.py --config=configs/pathfinder.py:dense,res=64,difficulty=intermediate
    python train.py --config=configs/pathfinder.py:linear,small,difficulty=easy --workdir=runs/pf32_small
    python train.py --config=configs/pathfinder.py:dense,tiny                           # seconds

Published (LRA.md: LRA repo pathfinder32 Transformer): 4 layers, 4 heads, emb 32, qkv 16,
MLP 32, batch 512, Adam(0.9, 0.98, 1e-9), no weight decay, lr 1e-3 with one epoch of linear
warmup (160,000 // 512 = 312 steps) then cosine decay, 200 epochs, mean pooling, dropout 0.1,
sinusoidal positions (base config: learn_pos_emb False). Data: 200,000 images split
160,000 / 20,000 / 20,000 (the release's 80/10/10).
Deviations: data is generated on the fly by lra/_pathfinder_gen.py (a faithful re-implementation
of the generator, see docs/tasks.md) unless data.data_dir points at the release; every pixel is a
real token (LRA's mask `inputs > 0` made black pixels padding). Resolution 64/128/256 and
easy/intermediate difficulties are options (res=..., difficulty=...); the model stays the same.
"""

from configs import common
from configs import variants as variant_table


def set_data(c, resolution: int, difficulty: str):
    c.data.resolution = resolution               # image side: 32 | 64 | 128 | 256
    c.data.difficulty = difficulty               # easy | intermediate | hard (6 / 9 / 14 paddles)
    c.data.max_len = resolution * resolution     # one token per pixel
    c.data.data_dir = ""                          # "" = generate; else the release root (docs)
    c.data.gen_seed = 0                           # generator seed (the data), not the run seed
    c.data.update(num_train=160000, num_val=20000, num_test=20000)  # the release's 80/10/10
    c.data.memoize = True                         # keep generated images in memory once made


def published(variant: str, task: str, keys: dict, resolution: int):
    """LRA's pathfinder32 setup at data.resolution (configs/pathx.py starts from it)."""
    c = common.base_config(task, variant)
    c.model.update(num_heads=4, emb_dim=32, qkv_dim=16, mlp_dim=32)  # LRA pathfinder32 model
    c.model.pooling = "mean"
    set_data(c, int(keys.get("res", resolution)), keys.get("difficulty", "hard"))
    c.data.update(batch_size=512, eval_batch_size=512)
    common.epochs_cosine(c, c.data.num_train, epochs=200, learning_rate=1e-3)
    return c


def get_config(arg=None):
    variant, flags, keys = common.parse_arg(
        arg, known_flags=("tiny", "small"), known_keys=("res", "difficulty"))
    c = published(variant, "pathfinder", keys, resolution=32)
    if "tiny" in flags:
        shrink_tiny(c)
    elif "small" in flags:
        shrink_small(c)
    return c


def shrink_tiny(c):
    """Seconds on a CPU (tests): a 32 x 32 image is still 1,024 tokens."""
    common.shrink_tiny(c, max_len=c.data.max_len)
    c.data.update(num_train=256, num_val=64, num_test=64)


def shrink_small(c):
    """CPU-sized run on generated Pathfinder-32: 2 small layers, batch 16, 4,000 steps (about
    35 minutes with `linear` attention on a 2-core CPU). Outcome in docs/tasks.md."""
    set_data(c, 32, c.data.difficulty)
    c.model.update(num_layers=2, num_heads=2, emb_dim=32, qkv_dim=32, mlp_dim=64,
                   dropout_rate=0.0, attention_dropout_rate=0.0)
    c.data.update(num_train=20000, num_val=1000, num_test=1000, batch_size=16,
                  eval_batch_size=250)
    c.train.update(steps=4000, warmup_steps=200, learning_rate=1e-3, log_every=50,
                   eval_every=500, checkpoint_every=500, eval_examples=1000)
    variant_table.shrink_for_length(c.attention, c.data.max_len)
