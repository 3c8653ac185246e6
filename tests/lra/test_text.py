"""Text task (IMDB bytes) through tfds.data_source under tfds.testing.mock_data (no TensorFlow,
no download): the real loading code path with generated records."""

import functools

import numpy as np
import pytest

import lra
from configs import text as text_config
from lra._data import ByteSource
from tests.lra.conftest import mocked_records, tiny_data

N = 24


_cfg = functools.partial(tiny_data, text_config)     # the tiny data config, fields changed


@pytest.fixture
def mocked():
    yield from mocked_records("imdb_reviews", N)


def _expected(record, max_len):
    text = record["text"]
    b = text if isinstance(text, bytes) else text.encode("utf-8")
    return b[:max_len]


def test_tokens_are_the_review_bytes_with_a_mask(mocked):
    task = lra.get_task(_cfg(max_len=12))
    assert (task.num_classes, task.vocab_size, task.max_len, task.pair) == (2, 256, 12, False)
    src = task.splits["train"]
    batch = src.get_batch(np.arange(N))
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (N, 12)
    assert batch["mask"].dtype == bool
    for i, rec in enumerate(mocked["train"]):
        want = _expected(rec, 12)
        n = len(want)
        assert batch["mask"][i].sum() == n and batch["mask"][i, :n].all()
        assert bytes(batch["inputs"][i, :n].astype(np.uint8)) == want
        assert (batch["inputs"][i, n:] == 0).all()
        assert batch["label"][i] == int(rec["label"])
    one = src[3]
    assert (one["inputs"] == batch["inputs"][3]).all() and one["label"] == batch["label"][3]


def test_validation_is_test_by_default_and_carved_from_train_on_request(mocked):
    task = lra.get_task(_cfg())
    assert task.splits["validation"] is task.splits["test"]
    carved = lra.get_task(_cfg(val_from_train=True, val_fraction=0.25))
    tr, va = carved.splits["train"], carved.splits["validation"]
    assert len(tr) + len(va) == N and len(va) == round(N * 0.25)
    assert not set(tr.indices) & set(va.indices)
    full = lra.get_task(_cfg()).splits["train"].get_batch(np.arange(N))
    got = va.get_batch(np.arange(len(va)))
    np.testing.assert_array_equal(got["inputs"], full["inputs"][va.indices])
    np.testing.assert_array_equal(va.labels(), full["label"][va.indices])


def test_byte_zero_is_a_token_and_truncation():
    src = ByteSource([b"a\x00b", b"", b"xyzw"], [1, 0, 1], max_len=3)
    batch = src.get_batch(np.arange(3))
    np.testing.assert_array_equal(batch["inputs"], [[97, 0, 98], [0, 0, 0], [120, 121, 122]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1], [0, 0, 0], [1, 1, 1]])


def test_missing_data_names_task_dataset_and_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lra.get_task(_cfg(data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "text" in msg and "imdb_reviews" in msg and "tfds build" in msg
    assert str(tmp_path) in msg and "array_record" in msg
