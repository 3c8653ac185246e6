"""Task `lm`: stdlib source split by a stable hash of each path, one-byte-overlap windows that
make every byte a target once, caps, provenance, refusal of non-causal variants."""

import os
import sysconfig

import numpy as np
import pytest

import attention
import lra
from configs import lm as lm_config
from lra import lm


def _write_tree(root, names):
    for i, name in enumerate(names):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write((f"# file {name}\n" + "x = %d\n" % i * (5 + i % 7)).encode())


def _cfg(root="", **over):
    c = lm_config.get_config("dense,tiny").data
    c.data_dir = str(root)
    for k, v in over.items():
        c[k] = v
    return c


def _names(n):
    return [f"pkg{i % 5}/mod_{i}.py" for i in range(n)]


def test_split_is_stable_disjoint_and_ignores_other_files(tmp_path):
    _write_tree(tmp_path / "a", _names(80) + ["site-packages/x.py", "p/__pycache__/y.py"])
    _write_tree(tmp_path / "b", _names(120))  # 40 more files: the first 80 keep their split
    files_a = lm.list_files(str(tmp_path / "a"))
    assert len(files_a) == 80 and not any("site-packages" in f or "cache" in f for f in files_a)
    parts_a = lm.split_files(files_a, 0.2, 0.2)
    parts_b = lm.split_files(lm.list_files(str(tmp_path / "b")), 0.2, 0.2)
    sets = {k: set(v) for k, v in parts_a.items()}
    assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"]
                or sets["validation"] & sets["test"])
    assert set().union(*sets.values()) == set(files_a)
    assert all(sets.values())
    for split, names in parts_a.items():
        assert sets[split] <= set(parts_b[split])
    # The hash is of the path alone (a regression guard: the split may never move silently).
    assert lm.path_fraction("os.py") == pytest.approx(0.850948727781281, abs=1e-15)
    assert lm.path_fraction("json/decoder.py") == pytest.approx(0.23117427244379962, abs=1e-15)


def test_every_byte_but_the_first_is_a_target_once(tmp_path):
    _write_tree(tmp_path, _names(60))
    task = lra.get_task(_cfg(tmp_path, max_len=9, validation_fraction=0.2, test_fraction=0.2,
                             train_bytes=0, eval_bytes=0))
    assert task.causal and (task.vocab_size, task.num_classes, task.max_len) == (256, 256, 9)
    for split, src in task.splits.items():
        info = task.info["splits"][split]
        data = b"".join(open(tmp_path / rel, "rb").read() for rel, _ in info["files"])
        assert info["bytes"] == len(data) == sum(n for _, n in info["files"])
        b = src.get_batch(np.arange(len(src)))
        assert b["inputs"].shape == (len(src), 9)
        # next-token targets of each window: positions 1.. where both ends are real
        targets = [row[1:][m[1:]] for row, m in zip(b["inputs"], b["mask"])]
        assert bytes(np.concatenate(targets).astype(np.uint8)) == data[1:]
        # window i starts where window i-1 ended (one byte of overlap)
        assert (b["inputs"][1:, 0] == b["inputs"][:-1, -1]).all()


def test_caps_and_provenance(tmp_path):
    _write_tree(tmp_path, _names(60))
    task = lra.get_task(_cfg(tmp_path, max_len=16, validation_fraction=0.2,
                             test_fraction=0.2, train_bytes=300, eval_bytes=100))
    sp = task.info["splits"]
    assert sp["train"]["bytes"] == 300 and sp["validation"]["bytes"] == sp["test"]["bytes"] == 100
    full = lm.split_files(lm.list_files(str(tmp_path)), 0.2, 0.2)
    for split in sp:  # the capped split reads a prefix of the split's files in hash order
        read = [rel for rel, _ in sp[split]["files"]]
        assert read == full[split][:len(read)]
    assert 0 < task.info["test_unigram_bits_per_byte"] <= 8


def test_bad_fields_and_empty_split_are_clear_errors(tmp_path):
    _write_tree(tmp_path, _names(2))
    with pytest.raises(ValueError, match="split .* needs at least 2"):
        lra.get_task(_cfg(tmp_path, validation_fraction=0.01, test_fraction=0.01))
    with pytest.raises(ValueError, match="validation_fraction"):
        lra.get_task(_cfg(tmp_path, validation_fraction=0.0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .py files"):
        lra.get_task(_cfg(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lra.get_task(_cfg(tmp_path / "absent"))


def test_stdlib_of_the_running_interpreter():
    task = lra.get_task(_cfg("", max_len=32))
    assert task.info["root"] == sysconfig.get_paths()["stdlib"]
    sp = task.info["splits"]
    assert sp["train"]["bytes"] == 256 * 1024 and sp["test"]["bytes"] == 16 * 1024
    names = [rel for s in sp.values() for rel, _ in s["files"]]
    assert len(names) == len(set(names)) and not any("site-packages" in n for n in names)


def test_lm_config_refuses_non_causal_variants():
    non_causal = [n for n in attention.names() if not attention.get(n).supports_causal]
    assert non_causal, "the registry has no non-causal variant to test the refusal with"
    for name in non_causal:
        with pytest.raises(ValueError, match="must support causal attention"):
            lm_config.get_config(f"{name},tiny")
    c = lm_config.get_config("local,small")
    assert c.train.objective == "causal_lm" and c.data.task == "lm"
    assert c.attention.window < c.data.max_len // 4   # still sparse at the small context
