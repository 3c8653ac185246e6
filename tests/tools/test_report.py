"""tools.report and tools.plots on a sweep root written by hand: Table 1 cells, averages over
the five LRA tasks, failed / unfinished / not-run cells, published numbers, parameter counts."""

import csv
import json
import os

import matplotlib.image as mpimg
import pytest

from tools import lra_published, plots, report

RUNS = {  # (task, variant) -> (test_accuracy, num_params)
    ("listops", "dense"): (0.375, 1000),
    ("text", "dense"): (0.625, 2000),
    ("image", "dense"): (0.5, 3000),
    ("listops", "performer"): (0.25, 1100),
}


def _write(root, task, variant, files):
    d = os.path.join(root, task, variant)
    os.makedirs(d, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("root"))
    for (task, variant), (acc, params) in RUNS.items():
        _write(root, task, variant, {"results.json": {
            "test_accuracy": acc, "best_val_accuracy": acc + 0.01, "num_params": params,
            "steps": 10, "wall_time_sec": 1.5, "test_majority_rate": 0.1,
            "environment": {"jax": "x"}}})
    _write(root, "text", "performer", {
        "status.json": {"status": "failed", "error": "RuntimeError: boom | bad"},
        "error.txt": "Traceback (most recent call last):\nRuntimeError: boom | bad\n"})
    _write(root, "image", "performer", {"config.json": {"seed": 0}})  # started, not finished
    out = os.path.join(root, "..", "out_" + os.path.basename(root))
    rep = report.build(root, out)
    return root, out, rep


def test_cells_and_averages(built):
    _, out, rep = built
    acc = rep["accuracy"]
    assert acc["tasks"] == ["listops", "text", "image"]  # LRA column order
    assert acc["variants"] == ["dense", "performer"]
    cells = acc["cells"]
    assert cells["dense"]["text"]["accuracy"] == 62.5
    assert cells["performer"]["text"]["status"] == "failed"
    assert cells["performer"]["image"]["status"] == "unfinished"
    assert acc["avg"]["dense"] == {"accuracy": 50.0, "tasks": 3,
                                   "published": lra_published.TABLE1["Transformer"]["avg"],
                                   "lra_model": "Transformer"}
    assert acc["avg"]["performer"]["accuracy"] == 25.0
    with open(os.path.join(out, "accuracy.csv")) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert rows["dense"]["image"] == "50.0" and rows["dense"]["image_published"] == "42.44"
    assert rows["performer"]["text"] == "failed" and rows["performer"]["image"] == "unfinished"
    assert rows["performer"]["listops_published"] == "18.01"
    md = open(os.path.join(out, "accuracy.md")).read()
    assert "| dense | 37.50 (36.37) | 62.50 (64.27) | 50.00 (42.44) | 50.00 [3/5] (54.39) |" in md
    assert "| performer | 25.00 (18.01) | fail (65.40) | unfinished (42.77) |" in md
    assert "RuntimeError: boom / bad" in md  # the error, with the table's separator escaped


def test_params_table(built):
    _, out, rep = built
    with open(os.path.join(out, "accuracy_params.csv")) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    for (task, variant), (_, params) in RUNS.items():
        assert int(rows[variant][task]) == params
    assert rows["performer"]["text"] == ""  # failed: no count
    assert rep["params"]["params"]["dense"]["image"] == 3000


def test_without_published(built):
    root, out, _ = built
    rep = report.build(root, out + "_np", published=False)
    assert "published" not in rep["accuracy"]["cells"]["dense"]["listops"]
    md = open(os.path.join(out + "_np", "accuracy.md")).read()
    assert "(36.37)" not in md and "| dense | 37.50 |" in md


def test_pathx_published_is_fail_and_unknown_variant_unmatched(tmp_path):
    _write(str(tmp_path), "pathx", "dense", {"results.json": {"test_accuracy": 0.5}})
    _write(str(tmp_path), "pathx", "my_new_variant", {"results.json": {"test_accuracy": 0.5}})
    acc = report.accuracy_table(report.collect(str(tmp_path)))
    assert acc["cells"]["dense"]["pathx"]["published"] == "FAIL"
    assert "published" not in acc["cells"]["my_new_variant"]["pathx"]
    assert acc["avg"]["dense"]["accuracy"] is None  # Path-X is not in the LRA average


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        report.collect(str(tmp_path / "nope"))


def test_accuracy_plot_has_a_bar_per_variant_and_task(built):
    _, out, rep = built
    bars = {(v, t): (a, p) for v, t, a, p in plots.accuracy_bars(rep)}
    assert len(bars) == 6
    for (task, variant), (acc, _) in RUNS.items():
        assert bars[(variant, task)][0] == pytest.approx(100 * acc)
    assert bars[("performer", "text")] == (None, 65.40)  # failed: no bar, the paper's marker
    path = plots.plot_accuracy(rep, os.path.join(out, "acc.png"))
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.std() > 0.05  # a drawn figure, not blank


def test_seeds_are_averaged_pretrained_rows_apart_and_lm_table(tmp_path):
    """seed_<n>/ runs average into one cell (mean ± std [n]); a run with train.init_from is its
    own row named by the pretraining objective; lm runs go to the bits-per-byte table."""
    scratch, spt = str(tmp_path / "scratch"), str(tmp_path / "spt")
    for seed, acc in enumerate((0.30, 0.40, 0.50)):
        _write(scratch, "listops", os.path.join("dense", f"seed_{seed}"), {"results.json": {
            "test_accuracy": acc, "num_params": 10, "config": {"train": {}}}})
        pre = os.path.join(spt, "listops", "dense", f"seed_{seed}", "pretrain")
        _write(spt, "listops", os.path.join("dense", f"seed_{seed}", "pretrain"),
               {"config.json": {"train": {"objective": "denoise"}}})
        _write(spt, "listops", os.path.join("dense", f"seed_{seed}"), {"results.json": {
            "test_accuracy": acc + 0.2, "num_params": 10,
            "config": {"train": {"init_from": pre}}}})
    for variant, bpb, rate in (("dense", 2.5, 3.0), ("local", 2.75, 6.0)):
        _write(str(tmp_path / "lm"), "lm", variant, {
            "results.json": {"test_accuracy": 0.4, "test_bits_per_byte": bpb,
                             "validation_bits_per_byte": bpb + 0.1,
                             "config": {"data": {"max_len": 256}, "train": {}}},
            "metrics.jsonl": "\n".join(json.dumps({"split": "train", "steps_per_sec": r})
                                       for r in (0.1, rate, rate, rate + 1.0))})
    roots = ",".join([scratch, spt, str(tmp_path / "lm")])
    rep = report.build(roots, str(tmp_path / "out"))
    cells = rep["accuracy"]["cells"]
    assert rep["accuracy"]["variants"] == ["dense", "dense+denoise"]
    assert cells["dense"]["listops"]["accuracy"] == 40.0 and cells["dense"]["listops"]["n"] == 3
    assert cells["dense"]["listops"]["std"] == pytest.approx(8.16, abs=0.01)
    assert cells["dense+denoise"]["listops"]["accuracy"] == 60.0
    assert "lm" not in rep["accuracy"]["tasks"]
    md = open(tmp_path / "out" / "accuracy.md").read()
    assert "| dense | 40.00 ± 8.16 [3] (36.37) |" in md
    lm = rep["lm"]["cells"]
    assert lm["dense"][256]["test_bits_per_byte"] == 2.5
    assert lm["local"][256]["steps_per_sec"] == 6.0   # median of the rates after the first
    assert "| local | 2.750 | 6 |" in md


def test_archived_logs_name_no_machine_path(tmp_path):
    """A recorded command reads as typed in the repository: interpreter, sweep root and repo
    root are replaced; other absolute paths (e.g. the data a run read) stay."""
    import json
    import os
    import sys

    root = tmp_path / "sweep"
    (root / "lm" / "dense").mkdir(parents=True)
    command = [sys.executable, os.path.join(report.REPO_ROOT, "train.py"),
               f"--workdir={root / 'lm' / 'dense'}", "--config.data.data_dir=/data/x"]
    (root / "lm" / "dense" / "status.json").write_text(json.dumps({"command": command}))
    dest = os.path.join(report.REPO_ROOT, "results", "runs", "_test_archive")
    try:
        assert report.archive_runs(str(root), dest) == 1
        with open(os.path.join(dest, "lm", "dense", "status.json")) as f:
            saved = json.load(f)["command"]
    finally:
        import shutil
        shutil.rmtree(dest, ignore_errors=True)
    assert saved == ["python3", "train.py", "--workdir=results/runs/_test_archive/lm/dense",
                     "--config.data.data_dir=/data/x"]
