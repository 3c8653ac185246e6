"""ListOps: generator faithful to LRA's, release format, reader, tokenizer, task."""

import os

import ml_collections
import numpy as np
import pytest

from lra import listops as L


def stack_eval(tokens):
    """Independent evaluator of the prefix token form (parentheses dropped), right to left."""
    stack = []
    for tok in reversed(tokens):
        if tok == "]":
            stack.append(tok)
        elif tok.isdigit():
            stack.append(int(tok))
        else:  # operator: pop its arguments up to the matching "]"
            args = []
            while stack[-1] != "]":
                args.append(stack.pop())
            stack.pop()
            if tok == "[MIN":
                stack.append(min(args))
            elif tok == "[MAX":
                stack.append(max(args))
            elif tok == "[MED":
                stack.append(int(np.median(args)))
            elif tok == "[SM":
                stack.append(sum(args) % 10)
            else:
                raise AssertionError(tok)
    assert len(stack) == 1
    return stack[0]


def prefix_tokens(release):
    return [t for t in release.split() if t not in ("(", ")")]


@pytest.fixture(scope="module")
def sample():
    return L.generate(60, seed=3, min_length=20, max_length=200)


def test_labels_match_independent_evaluator(sample):
    for source, label in sample:
        assert stack_eval(prefix_tokens(source)) == label


def test_length_bounds_and_no_duplicates(sample):
    lengths = [len(prefix_tokens(s)) for s, _ in sample]
    assert all(20 < n < 200 for n in lengths)
    assert len({s for s, _ in sample}) == len(sample)


def test_default_bounds_match_lra():
    rows = L.generate(3, seed=0)
    assert all(500 < len(prefix_tokens(s)) < 2000 for s, _ in rows)


def test_deterministic_from_seed():
    a = L.generate(10, seed=7, min_length=10, max_length=100)
    b = L.generate(10, seed=7, min_length=10, max_length=100)
    c = L.generate(10, seed=8, min_length=10, max_length=100)
    assert a == b and a != c


def test_release_bracketing():
    assert L.to_release_string(("[MAX", [2, ("[MIN", [9, 4])])) == \
        "( ( ( [MAX 2 ) ( ( ( [MIN 9 ) 4 ) ] ) ) ] )"
    assert L.to_release_string(("[MAX", [1, 7, 2])) == "( ( ( ( [MAX 1 ) 7 ) 2 ) ] )"
    assert stack_eval(prefix_tokens("( ( ( [MAX 2 ) ( ( ( [MIN 9 ) 4 ) ] ) ) ] )")) == 4


def test_operator_semantics():
    assert L.evaluate(("[MED", [1, 2, 3, 9])) == 2  # int(2.5)
    assert L.evaluate(("[SM", [9, 8, 7])) == 4
    assert L.evaluate(("[MIN", [5, 3, 8])) == 3


def test_tsv_round_trip(tmp_path):
    paths = L.generate_files(str(tmp_path), num_train=20, num_val=5, num_test=5, seed=1,
                             min_length=10, max_length=80)
    with open(paths["train"]) as f:
        assert f.readline() == "Source\tTarget\n"
    rows = L.generate(30, seed=1, min_length=10, max_length=80)
    seqs, labels = L.read_tsv(paths["train"])
    assert labels.tolist() == [lab for _, lab in rows[:20]]
    assert seqs == [L.tokenize(s) for s, _ in rows[:20]]
    # splits are disjoint
    all_src = []
    for p in paths.values():
        with open(p) as f:
            all_src += [line.split("\t")[0] for line in f.readlines()[1:]]
    assert len(set(all_src)) == 30


def test_tokenizer():
    assert len(L.VOCAB) == 16 and L.VOCAB[0] == "<pad>"
    ids = L.tokenize("( ( [SM 3 ) 4 ] )")
    assert [L.VOCAB[i] for i in ids] == ["[SM", "3", "4", "]"]
    assert L.PAD_ID not in ids
    with pytest.raises(ValueError, match="unknown ListOps token"):
        L.tokenize("[POW 2 3 ]")


@pytest.mark.parametrize("row, message", [
    ("( [MAX 1 2 ] )\t3\textra", "expected 2 tab-separated columns"),
    ("( [MAX 1 2 ] )\tseven", "invalid literal"),
    ("( [MAX 1 2 ] )\t12", "outside 0-9"),
    ("( [FOO 1 2 ] )\t2", "unknown ListOps token"),
])
def test_bad_row_names_file_and_line(tmp_path, row, message):
    path = tmp_path / "basic_train.tsv"
    path.write_text("Source\tTarget\n( [MIN 1 2 ] )\t1\n" + row + "\n")
    with pytest.raises(ValueError, match=rf"basic_train.tsv:3: .*{message}"):
        L.read_tsv(str(path))


def test_non_utf8_byte_and_header_only_file_name_the_file(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(b"Source\tTarget\n( [MIN 1 2 ] )\t1\n( [MAX \xff 2 ] )\t2\n")
    with pytest.raises(ValueError, match=r"basic_train.tsv:3: not UTF-8 text \(byte 0xff at "
                                         r"column 8\)"):
        L.read_tsv(str(path))
    path.write_text("Source\tTarget\n")
    with pytest.raises(ValueError, match=r"basic_train.tsv: no examples"):
        L.read_tsv(str(path))


def test_bad_header(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("src\tlabel\n")
    with pytest.raises(ValueError, match="x.tsv:1: expected header"):
        L.read_tsv(str(path))


def _data_cfg(tmp_path, **kw):
    c = ml_collections.ConfigDict(dict(
        task="listops", data_dir="", cache_dir=str(tmp_path / "cache"), max_len=64,
        num_train=40, num_val=10, num_test=10, min_length=5, max_length=60, gen_seed=0))
    c.update(kw)
    return c


def test_task_generates_once_then_reuses(tmp_path):
    task = L.build(_data_cfg(tmp_path))
    d = L.generated_dir(_data_cfg(tmp_path))
    stamp = os.path.getmtime(os.path.join(d, "basic_train.tsv"))
    again = L.build(_data_cfg(tmp_path))
    assert os.path.getmtime(os.path.join(d, "basic_train.tsv")) == stamp
    assert len(task.splits["train"]) == 40 and len(task.splits["test"]) == 10
    b1 = task.splits["train"].get_batch(np.arange(5))
    b2 = again.splits["train"].get_batch(np.arange(5))
    np.testing.assert_array_equal(b1["inputs"], b2["inputs"])
    # mask marks exactly the tokens; padding positions hold PAD and are masked out
    seqs, _ = L.read_tsv(os.path.join(d, "basic_train.tsv"))
    assert b1["mask"].sum(1).tolist() == [len(s) for s in seqs[:5]]
    assert (b1["inputs"][~b1["mask"]] == L.PAD_ID).all()
    assert b1["inputs"].dtype == np.int32 and b1["inputs"].shape == (5, 64)


def test_release_dir_read_and_missing_files(tmp_path):
    L.generate_files(str(tmp_path / "listops-1000"), num_train=8, num_val=4, num_test=4, seed=2,
                     min_length=5, max_length=60)
    task = L.build(_data_cfg(tmp_path, data_dir=str(tmp_path / "listops-1000")))
    assert len(task.splits["validation"]) == 4
    with pytest.raises(FileNotFoundError, match="basic_train.tsv.*listops-1000"):
        L.build(_data_cfg(tmp_path, data_dir=str(tmp_path / "nowhere")))


def test_too_long_sequence_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        L.build(_data_cfg(tmp_path, max_len=8))


def test_cli_writes_release_layout(tmp_path):
    L.main(["--out_dir", str(tmp_path), "--num_train", "5", "--num_val", "2", "--num_test", "2",
            "--seed", "4", "--min_length", "5", "--max_length", "40"])
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        assert (tmp_path / name).exists()
    seqs, labels = L.read_tsv(str(tmp_path / "basic_val.tsv"))
    assert len(seqs) == 2


def test_same_data_whatever_the_number_of_processes(tmp_path):
    """Chunks seeded by (seed, chunk) and taken in order: 1 process, 2 spawned workers from the
    start, or a switch to workers midway all give the same files."""
    kw = dict(num_train=150, num_val=20, num_test=20, seed=5, min_length=10, max_length=90)
    serial = L.generate_files(str(tmp_path / "p1"), processes=1, **kw)
    parallel = L.generate(190, 5, min_length=10, max_length=90, processes=2,
                          parallel_after_s=0.0)
    assert parallel == L.generate(190, 5, min_length=10, max_length=90)
    for split, path in serial.items():
        with open(path) as f:
            rows = [tuple(line.rstrip("\n").split("\t")) for line in f][1:]
        lo = {"train": 0, "validation": 150, "test": 170}[split]
        assert rows == [(s, str(y)) for s, y in parallel[lo:lo + len(rows)]]


def test_chunk_stream_is_a_prefix_and_distinct_per_chunk():
    a = L.generate(L.CHUNK + 5, 2, min_length=10, max_length=90)
    b = L.generate(3, 2, min_length=10, max_length=90)
    assert a[:3] == b                     # more examples extend the same stream
    c0 = L.generate_chunk(2, 0, min_length=10, max_length=90)
    c1 = L.generate_chunk(2, 1, min_length=10, max_length=90)
    assert len(c0) == len(c1) == L.CHUNK and c0 != c1
    with pytest.raises(ValueError, match="processes >= 1"):
        L.generate(3, 2, processes=0)


def test_abandoning_long_trees_keeps_the_distribution():
    """Chunks give up on a tree once it is too long; the kept trees are those the plain
    rejection loop keeps: compare length and label histograms on 1,280 short expressions."""
    import random
    fast = [r for k in range(20) for r in L.generate_chunk(9, k, min_length=10, max_length=60)]
    rng, slow = random.Random(9), []
    while len(slow) < len(fast):
        tree, length = L.generate_tree(rng)
        if 10 < length < 60:
            slow.append((L.to_release_string(tree), L.evaluate(tree)))
    lengths = lambda rows: np.array([len(prefix_tokens(s)) for s, _ in rows])  # noqa: E731
    bins = [10, 15, 20, 30, 40, 60]
    h_fast = np.histogram(lengths(fast), bins)[0] / len(fast)
    h_slow = np.histogram(lengths(slow), bins)[0] / len(slow)
    assert np.abs(h_fast - h_slow).max() < 0.06, (h_fast, h_slow)
    y_fast = np.bincount([y for _, y in fast], minlength=10) / len(fast)
    y_slow = np.bincount([y for _, y in slow], minlength=10) / len(slow)
    assert np.abs(y_fast - y_slow).max() < 0.05, (y_fast, y_slow)


def test_generator_commands_run_as_documented(tmp_path):
    """`python -m lra.listops` / `python -m lra.pathfinder` (README, docs/tasks.md): the module
    run as __main__ registers its task a second time without error; bad counts are refused."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    ok = run("lra.listops", "--out_dir", str(tmp_path / "lo"), "--num_train", "4", "--num_val",
             "2", "--num_test", "2", "--min_length", "5", "--max_length", "30",
             "--processes", "1")
    assert ok.returncode == 0, ok.stderr
    assert len(open(tmp_path / "lo" / "basic_train.tsv").read().splitlines()) == 1 + 4
    bad = run("lra.pathfinder", "--out_dir", str(tmp_path / "pf"), "--num", "0")
    assert bad.returncode == 2 and "--num: must be >= 1; got 0" in bad.stderr
    assert not (tmp_path / "pf").exists()
