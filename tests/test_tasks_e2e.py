"""One tiny end-to-end training run per LRA task through train.train_and_evaluate: the task's
data (mocked tfds records, small release-format files, or generated images) flows through the
shared loop, and every test example is evaluated exactly once."""

import json
import math
import os

import pytest
import tensorflow_datasets as tfds

import lra
import train
from configs import image, pathfinder, pathx, retrieval, text


pytestmark = pytest.mark.usefixtures("fast_compile")


def _shrink(c, tmp_path, batch):
    c.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    c.data.update(batch_size=batch, eval_batch_size=4, workers=1,
                  cache_dir=str(tmp_path / "cache"))
    return c


def _run_and_check(c, tmp_path, name):
    task = lra.get_task(c.data)
    results = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert results["task"] == name and results["steps"] == 2
    assert 0.0 <= results["test_accuracy"] <= 1.0 and math.isfinite(results["test_loss"])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert train_rows and all(math.isfinite(r["loss"]) for r in train_rows)
    test_rows = [r for r in rows if r.get("split") == "test"]
    assert test_rows[-1]["examples"] == len(task.splits["test"])   # padded last batch, weight 0
    return results


def _write_aan(folder):
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", 12), ("eval", 4), ("test", 6)):
        with open(os.path.join(folder, f"new_aan_pairs.{split}.tsv"), "w") as f:
            for i in range(n):
                f.write(f"{i % 2}\tp{i}\tq{i}\tpaper {i} on parsing\tpaper {i + 1} cites it\n")


def test_text(tmp_path):
    c = _shrink(text.get_config("dense,tiny"), tmp_path, 4)
    with tfds.testing.mock_data(num_examples=10):
        _run_and_check(c, tmp_path, "text")


def test_retrieval(tmp_path):
    _write_aan(tmp_path / "aan")
    c = _shrink(retrieval.get_config("dense,tiny"), tmp_path, 4)
    c.data.data_dir = str(tmp_path / "aan")
    _run_and_check(c, tmp_path, "retrieval")


def test_image(tmp_path):
    c = _shrink(image.get_config("dense,tiny"), tmp_path, 2)
    with tfds.testing.mock_data(num_examples=10):
        _run_and_check(c, tmp_path, "image")


@pytest.mark.parametrize("module,name", [(pathfinder, "pathfinder"), (pathx, "pathx")])
def test_pathfinder_and_pathx(tmp_path, module, name):
    c = _shrink(module.get_config("dense,tiny"), tmp_path, 2)
    c.data.num_train, c.data.num_val, c.data.num_test = 8, 4, 6
    _run_and_check(c, tmp_path, name)
