"""Image classification (LRA "Image"): CIFAR-10 (Krizhevsky, 2009) as a sequence of 1,024
grayscale pixels.

Data: `tfds.data_source("cifar10")`, read without TensorFlow. Each 32 x 32 RGB image becomes
gray = round(0.299 R + 0.587 G + 0.114 B) (ITU-R BT.601 luma), flattened row-major to 1,024
tokens with values 0-255 (vocab 256). Every pixel is a real token: the mask is all True (the
original LRA code masked `inputs > 0`, treating black pixels as padding). Splits as LRA:
train = first 90% of tfds train (45,000), validation = last 10% (5,000), test = test (10,000).
Task.grid_shape = (32, 32) tells 2D attention variants the image shape.
"""

from __future__ import annotations

import numpy as np

from lra._data import read_all, tfds_source
from lra.base import PixelSource, Task, register_task

TFDS_NAME = "cifar10"
SIDE = 32
NUM_CLASSES = 10
VOCAB_SIZE = 256
LUMA = np.asarray([0.299, 0.587, 0.114])   # ITU-R BT.601


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> uint8 [..., H, W]: round(0.299 R + 0.587 G + 0.114 B)."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"image: expected RGB images [..., 3]; got shape {rgb.shape}")
    return np.clip(np.rint(rgb.astype(np.float64) @ LUMA), 0, 255).astype(np.uint8)


def load_split(split: str, data_dir: str | None):
    """-> (pixels uint8 [N, 1024], labels int32 [N]) of a tfds split."""
    records = read_all(tfds_source("image", TFDS_NAME, split, data_dir))
    if not records:
        return np.zeros((0, SIDE * SIDE), np.uint8), np.zeros((0,), np.int32)
    images = np.stack([np.asarray(r["image"]) for r in records])
    if images.shape[1:] != (SIDE, SIDE, 3):
        raise ValueError(f"image: {TFDS_NAME} split {split!r} has images of shape "
                         f"{images.shape[1:]}; expected {(SIDE, SIDE, 3)}")
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return to_gray(images).reshape(len(images), SIDE * SIDE), labels


@register_task("image")
def build(cfg) -> Task:
    if cfg.max_len != SIDE * SIDE:
        raise ValueError(f"image: data.max_len must be {SIDE * SIDE} (32 x 32 pixels); "
                         f"got {cfg.max_len!r}")
    data_dir = cfg.get("data_dir", "") or None
    pixels, labels = load_split("train", data_dir)
    n_train = (len(labels) * 9) // 10                 # tfds "train[:90%]" of 50,000 = 45,000
    test_pixels, test_labels = load_split("test", data_dir)
    splits = {"train": PixelSource(pixels[:n_train], labels[:n_train]),
              "validation": PixelSource(pixels[n_train:], labels[n_train:]),
              "test": PixelSource(test_pixels, test_labels)}
    return Task(name="image", splits=splits, num_classes=NUM_CLASSES, vocab_size=VOCAB_SIZE,
                max_len=SIDE * SIDE, grid_shape=(SIDE, SIDE),
                info={"origin": f"tfds {TFDS_NAME} in {data_dir or 'default data dir'}",
                      **{f"num_{k}": len(v) for k, v in splits.items()}})
