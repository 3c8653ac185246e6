"""Text (LRA): byte-level IMDB, the published Transformer setup of the LRA repository.

    python train.py --config=configs/text.py:dense --workdir=runs/text_dense
    python train.py --config=configs/text.py:performer,len=4000     # the paper's 4K length
    python train.py --config=configs/text.py:dense,val_from_train   # validation carved from train
    python train.py --config=configs/text.py:dense,tiny             # seconds on a CPU

Published (LRA repo text_classification base config): 4 layers, 4 heads, emb 256, qkv 256,
MLP 1024, batch 32, Adam(0.9, 0.98, 1e-9) with weight decay 0.1, lr 0.05 with 8000 linear
warmup steps then rsqrt decay, 20,000 steps, max_len 1000 (the paper reports 4K: `len=4000`),
CLS pooling, dropout 0.1.
Deviations: bytes are ids 0-255 with padding marked by the mask (LRA's ByteTextEncoder shifted
bytes by one to keep 0 for padding); LRA validates on the test split, so does the default here
(`val_from_train` carves 10% of train instead); weight decay is decoupled (optax.adamw).
"""

from configs import common


def get_config(arg=None):
    variant, flags, keys = common.parse_arg(
        arg, known_flags=("tiny", "val_from_train"), known_keys=("len",))
    c = common.base_config("text", variant)
    c.model.update(num_heads=4, emb_dim=256, qkv_dim=256)     # LRA text: 4 heads, width 256
    c.data.max_len = int(keys.get("len", 1000))               # bytes per review (truncated)
    c.data.val_from_train = "val_from_train" in flags         # False: validation = test (LRA)
    c.data.val_fraction = 0.1                                 # with val_from_train: held out
    c.train.update(steps=20000, warmup_steps=8000, eval_every=1000, checkpoint_every=1000)
    if "tiny" in flags:
        common.shrink_tiny(c, max_len=64)
    return c
