"""Text classification (LRA "Text"): IMDB movie reviews (Maas et al., 2011) as bytes.

Data: `tfds.data_source("imdb_reviews")` (the plain_text config: 25,000 train and 25,000 test
reviews, labels 0 = negative, 1 = positive), read through ArrayRecord files without TensorFlow.
Tokens are the UTF-8 bytes of a review (ids 0-255, vocab 256), truncated to data.max_len
(LRA: 1000 in its config, 4000 in the paper); shorter reviews are padded and masked.

Splits: LRA evaluates on the test split for both validation and test (the default here,
data.val_from_train = False). data.val_from_train = True carves a validation split from train
instead: a fixed permutation (seed 0) of the 25,000 training reviews, the last
data.val_fraction of it (default 10%) for validation, the rest for training; test stays test.
"""

from __future__ import annotations

import numpy as np

from lra._data import ByteSource, read_all, tfds_source, to_bytes
from lra.base import SubsetSource, Task, register_task

TFDS_NAME = "imdb_reviews"
NUM_CLASSES = 2
VOCAB_SIZE = 256     # bytes; padding is the mask, never a token value


def load_split(split: str, max_len: int, data_dir: str | None) -> ByteSource:
    records = read_all(tfds_source("text", TFDS_NAME, split, data_dir))
    texts = [to_bytes(r["text"]) for r in records]
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"text: {TFDS_NAME} split {split!r} has labels outside 0-1 "
                         f"({sorted(set(labels.tolist()))})")
    return ByteSource(texts, labels, max_len)


def carve_validation(num: int, fraction: float, seed: int = 0):
    """-> (train indices, validation indices): the last `fraction` of a fixed permutation."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"text: data.val_fraction must be in (0, 1); got {fraction!r}")
    perm = np.random.default_rng(seed).permutation(num)
    n_val = max(1, int(round(num * fraction)))
    return np.sort(perm[:num - n_val]), np.sort(perm[num - n_val:])


@register_task("text")
def build(cfg) -> Task:
    if cfg.max_len < 1:
        raise ValueError(f"text: data.max_len must be >= 1; got {cfg.max_len!r}")
    data_dir = cfg.get("data_dir", "") or None
    train = load_split("train", cfg.max_len, data_dir)
    test = load_split("test", cfg.max_len, data_dir)
    if cfg.get("val_from_train", False):
        fraction = cfg.get("val_fraction", 0.1)
        tr, va = carve_validation(len(train), fraction)
        splits = {"train": SubsetSource(train, tr), "validation": SubsetSource(train, va),
                  "test": test}
        val_note = f"validation = {fraction:.0%} of train (fixed permutation)"
    else:
        splits = {"train": train, "validation": test, "test": test}
        val_note = "validation = test split (as LRA)"
    return Task(name="text", splits=splits, num_classes=NUM_CLASSES, vocab_size=VOCAB_SIZE,
                max_len=cfg.max_len,
                info={"origin": f"tfds {TFDS_NAME} in {data_dir or 'default data dir'}",
                      "validation": val_note,
                      **{f"num_{k}": len(v) for k, v in splits.items()}})
