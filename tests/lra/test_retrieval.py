"""Retrieval task (AAN pairs) from small TSV files written in the release format."""

import os

import numpy as np
import pytest

import lra
from configs import retrieval as retrieval_config

ROWS = {
    "train": [("1", "a1", "b1", "hello \"quoted\" world", "caf\u00e9 na\u00efve"),
              ("0.0", "a2", "b2", "", "x" * 50),
              ("1.0", "a3", "b3", "tab-free text", "z")],
    "eval": [("0", "c1", "d1", "eval doc one", "eval doc two")],
    "test": [("1", "e1", "e2", "t", "u"), ("0", "e3", "e4", "v", "w")],
}


def _write(folder, rows_by_split=ROWS):
    os.makedirs(folder, exist_ok=True)
    for split, rows in rows_by_split.items():
        with open(os.path.join(folder, f"new_aan_pairs.{split}.tsv"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write("\t".join(row) + "\n")


def _cfg(data_dir, cache_dir, max_len=16):
    c = retrieval_config.get_config("tiny").data
    c.data_dir, c.cache_dir, c.max_len = str(data_dir), str(cache_dir), max_len
    return c


def test_pairs_are_byte_tokens_with_masks(tmp_path):
    _write(tmp_path / "lra_release" / "tsv_data")          # the unpacked release's layout
    task = lra.get_task(_cfg(tmp_path, tmp_path / "cache"))
    assert task.pair and (task.num_classes, task.vocab_size, task.max_len) == (2, 256, 16)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 3, "validation": 1, "test": 2}
    batch = task.splits["train"].get_batch(np.arange(3))
    assert batch["inputs"].shape == (3, 2, 16) and batch["inputs"].dtype == np.int32
    assert batch["mask"].shape == (3, 2, 16) and batch["mask"].dtype == bool
    np.testing.assert_array_equal(batch["label"], [1, 0, 1])
    for i, row in enumerate(ROWS["train"]):
        for j, text in enumerate(row[3:]):
            want = text.encode("utf-8")[:16]
            assert batch["mask"][i, j].sum() == len(want)
            assert bytes(batch["inputs"][i, j, :len(want)].astype(np.uint8)) == want
            assert (batch["inputs"][i, j, len(want):] == 0).all()
    # second build reads the .npy cache (memory-mapped) and gives the same batches
    again = lra.get_task(_cfg(tmp_path, tmp_path / "cache")).splits["train"].get_batch(np.arange(3))
    for k in batch:
        np.testing.assert_array_equal(again[k], batch[k])
    assert os.listdir(tmp_path / "cache" / "retrieval")


def test_malformed_rows_name_file_and_line(tmp_path):
    bad = dict(ROWS, train=ROWS["train"][:2] + [("1", "a3", "b3", "only four")])
    _write(tmp_path, bad)
    with pytest.raises(ValueError, match=r"new_aan_pairs\.train\.tsv:3: expected 5"):
        lra.get_task(_cfg(tmp_path, ""))
    bad = dict(ROWS, eval=[("2", "c1", "d1", "x", "y")])
    _write(tmp_path, bad)
    with pytest.raises(ValueError, match=r"new_aan_pairs\.eval\.tsv:1: bad label"):
        lra.get_task(_cfg(tmp_path, ""))


def test_missing_files_say_what_to_download_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lra.get_task(_cfg(tmp_path, ""))
    msg = str(e.value)
    for part in ("retrieval", "new_aan_pairs.train.tsv", "lra_release.gz", "tsv_data"):
        assert part in msg
    assert str(tmp_path) in msg
