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
    c.model.update(num_layers=1, emb_dim=128, qkv_dim=64, mlp_dim=128)  # LRA cifar10 model
    c.model.update(dropout_rate=0.3, attention_dropout_rate=0.2, pos_embedding="learned")
    c.data.update(max_len=1024, batch_size=256, eval_batch_size=256)   # 32 x 32 pixels
    common.epochs_cosine(c, TRAIN_EXAMPLES, epochs=200, learning_rate=5e-4)
    if "tiny" in flags:
        common.shrink_tiny(c, max_len=1024)       # an image is 1,024 pixels whatever the size
    return c
