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
