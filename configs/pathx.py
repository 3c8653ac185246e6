"""Path-X (LRA): Pathfinder at 128 x 128 pixels (16,384 tokens), hard.

    python train.py --config=configs/pathx.py:performer --workdir=runs/pathx_performer
    python train.py --config=configs/pathx.py:dense,tiny     # pipeline check on a CPU (32 x 32)

Published: LRA reports Path-X with the Pathfinder models (every model FAILs, i.e. 50%); its repo's
pathfinder128 base config trains with batch 64, lr 1e-3, one epoch of linear warmup
(160,000 // 64 = 2,500 steps) then cosine decay, 200 epochs, gradient clipping at norm 1.0, no
weight decay, mean pooling, learned positions. The model here is the Pathfinder-32 Transformer
(4 layers, 4 heads, emb 32, qkv 16, MLP 32), as LRA's Table 1 compares the same models.
Deviations: data generated on the fly (lra/_pathfinder_gen.py) unless data.data_dir points at
the release (pathfinder128/curv_contour_length_14); every pixel is a real token. `tiny` keeps
the Path-X pipeline but at 32 x 32: 16,384-token dense attention does not fit a CPU test.
"""

from configs import common
from configs import pathfinder


def get_config(arg=None):
    variant, flags, keys = common.parse_arg(
        arg, known_flags=("tiny",), known_keys=("res", "difficulty"))
    c = common.base_config("pathx", variant)
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.emb_dim = 32
    c.model.qkv_dim = 16
    c.model.mlp_dim = 32
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.model.pooling = "mean"
    c.model.pos_embedding = "learned"

    pathfinder.set_data(c, int(keys.get("res", 128)), keys.get("difficulty", "hard"))
    c.data.batch_size = 64
    c.data.eval_batch_size = 64

    steps_per_epoch = c.data.num_train // c.data.batch_size
    c.train.steps = 200 * steps_per_epoch        # 200 epochs
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"
    c.train.warmup_steps = steps_per_epoch
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.eval_every = steps_per_epoch
    c.train.checkpoint_every = steps_per_epoch

    if "tiny" in flags:
        pathfinder.set_data(c, 32, c.data.difficulty)
        pathfinder.shrink_tiny(c)
    return c
