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
    c.data.num_train = 160000                     # generated split sizes (the release's 80/10/10)
    c.data.num_val = 20000
    c.data.num_test = 20000
    c.data.memoize = True                         # keep generated images in memory once made


def get_config(arg=None):
    variant, flags, keys = common.parse_arg(
        arg, known_flags=("tiny", "small"), known_keys=("res", "difficulty"))
    c = common.base_config("pathfinder", variant)
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.emb_dim = 32
    c.model.qkv_dim = 16
    c.model.mlp_dim = 32
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.model.pooling = "mean"
    c.model.pos_embedding = "sinusoidal"

    set_data(c, int(keys.get("res", 32)), keys.get("difficulty", "hard"))
    c.data.batch_size = 512
    c.data.eval_batch_size = 512

    steps_per_epoch = c.data.num_train // c.data.batch_size
    c.train.steps = 200 * steps_per_epoch        # 200 epochs
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"
    c.train.warmup_steps = steps_per_epoch       # one epoch
    c.train.weight_decay = 0.0
    c.train.eval_every = steps_per_epoch
    c.train.checkpoint_every = steps_per_epoch

    if "tiny" in flags:
        shrink_tiny(c)
    elif "small" in flags:
        shrink_small(c)
    return c


def shrink_tiny(c):
    """Seconds on a CPU (tests): a 32 x 32 image is still 1,024 tokens."""
    common.shrink_tiny(c, max_len=c.data.max_len)
    c.data.num_train, c.data.num_val, c.data.num_test = 256, 64, 64


def shrink_small(c):
    """CPU-sized run on generated Pathfinder-32: 2 small layers, batch 16, 4,000 steps (about
    35 minutes with `linear` attention on a 2-core CPU). Outcome in docs/tasks.md."""
    set_data(c, 32, c.data.difficulty)
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.emb_dim = 32
    c.model.qkv_dim = 32
    c.model.mlp_dim = 64
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    c.data.num_train, c.data.num_val, c.data.num_test = 20000, 1000, 1000
    c.data.batch_size = 16
    c.data.eval_batch_size = 250
    c.train.steps = 4000
    c.train.warmup_steps = 200
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.eval_examples = 1000
    variant_table.shrink_for_length(c.attention, c.data.max_len)
