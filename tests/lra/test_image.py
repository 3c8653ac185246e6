"""Image task (grayscale CIFAR-10) through tfds.data_source under tfds.testing.mock_data."""

import functools

import numpy as np
import pytest

import lra
from configs import image as image_config
from lra.image import PixelSource, to_gray
from tests.lra.conftest import mocked_records, tiny_data

N = 20


_cfg = functools.partial(tiny_data, image_config)     # the tiny data config, fields changed


@pytest.fixture
def mocked():
    yield from mocked_records("cifar10", N)


def test_pixels_are_itu601_gray_every_pixel_a_token(mocked):
    task = lra.get_task(_cfg())
    assert (task.num_classes, task.vocab_size, task.max_len) == (10, 256, 1024)
    assert task.grid_shape == (32, 32) and not task.pair
    n_train = (N * 9) // 10
    sizes = [len(task.splits[s]) for s in ("train", "validation", "test")]
    assert sizes == [n_train, N - n_train, N]
    rgb = np.stack([np.asarray(r["image"]) for r in mocked["train"]]).astype(np.int64)
    luma = (299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2]) / 1000.0   # exact
    got = np.concatenate([task.splits["train"].get_batch(np.arange(n_train))["inputs"],
                          task.splits["validation"].get_batch(np.arange(N - n_train))["inputs"]])
    assert got.dtype == np.int32
    assert np.abs(got.reshape(N, 32, 32) - luma).max() <= 0.5 + 1e-9     # rounded luma
    labels = np.asarray([int(r["label"]) for r in mocked["train"]])
    np.testing.assert_array_equal(task.splits["train"].labels(), labels[:n_train])
    np.testing.assert_array_equal(task.splits["validation"].labels(), labels[n_train:])
    batch = task.splits["test"].get_batch(np.arange(4))
    assert batch["mask"].all() and batch["mask"].shape == (4, 1024)


def test_black_pixels_are_tokens_not_padding():
    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[0, 0, :2] = [[255, 255, 255], [10, 20, 30]]
    gray = to_gray(rgb)
    assert gray[0, 0, 0] == 255 and gray[0, 0, 1] == round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)
    assert (gray[0, 1:] == 0).all()          # zeros stay zeros: real tokens, the mask says so
    src = PixelSource(gray.reshape(1, -1), np.zeros(1, np.int32))
    assert src[0]["mask"].all() and (src[0]["inputs"][2:] == 0).all()


def test_bad_max_len_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="image: data.max_len must be 1024"):
        lra.get_task(_cfg(max_len=64))
    with pytest.raises(FileNotFoundError) as e:
        lra.get_task(_cfg(data_dir=str(tmp_path)))
    assert "image" in str(e.value) and "cifar10" in str(e.value) and "tfds build" in str(e.value)
