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
    c = pathfinder.published(variant, "pathx", keys, resolution=128)
    c.model.pos_embedding = "learned"             # the pathfinder128 base config
    c.data.update(batch_size=64, eval_batch_size=64)
    common.epochs_cosine(c, c.data.num_train, epochs=200, learning_rate=1e-3)
    c.train.grad_clip = 1.0
    if "tiny" in flags:
        pathfinder.set_data(c, 32, c.data.difficulty)
        pathfinder.shrink_tiny(c)
    return c
