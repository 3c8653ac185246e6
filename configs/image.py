"""Image (LRA): grayscale CIFAR-10 as 1,024 pixel tokens; the published Transformer setup.

    python train.py --config=configs/image.py:dense --workdir=runs/image_dense
    python train.py --config=configs/image.py:axial,tiny      # 2D variants get grid (32, 32)

Published (LRA.md / LRA repo cifar10 configs): 1 layer, 8 heads, emb 128, qkv 64, MLP 128,
batch 256, Adam(0.9, 0.98, 1e-9), no weight decay, lr 5e-4 with one epoch of linear warmup
(45,000 // 256 = 175 steps) then cosine decay, 200 epochs (35,000 steps), dropout 0.3 and
attention dropout 0.2 (the repo's base cifar10 config), CLS pooling, learned positions.
Deviations: every pixel is a real token (LRA's mask `inputs > 0` made black pixels padding).
"""

from configs import common

TRAIN_EXAMPLES = 45000


def get_config(arg=None):
    variant, flags, _ = common.parse_arg(arg, known_flags=("tiny",))
    c = common.base_config("image", variant)
    c.model.num_layers = 1
    c.model.num_heads = 8
    c.model.emb_dim = 128
    c.model.qkv_dim = 64
    c.model.mlp_dim = 128
    c.model.dropout_rate = 0.3
    c.model.attention_dropout_rate = 0.2
    c.model.pooling = "cls"
    c.model.pos_embedding = "learned"

    c.data.max_len = 1024                         # 32 x 32 pixels, fixed
    c.data.batch_size = 256
    c.data.eval_batch_size = 256

    steps_per_epoch = TRAIN_EXAMPLES // c.data.batch_size
    c.train.steps = 200 * steps_per_epoch         # 200 epochs
    c.train.learning_rate = 5e-4
    c.train.schedule = "cosine"
    c.train.warmup_steps = steps_per_epoch        # one epoch
    c.train.weight_decay = 0.0
    c.train.eval_every = steps_per_epoch
    c.train.checkpoint_every = steps_per_epoch

    if "tiny" in flags:
        common.shrink_tiny(c, max_len=1024)       # an image is 1,024 pixels whatever the size
        c.data.max_len = 1024
    return c
