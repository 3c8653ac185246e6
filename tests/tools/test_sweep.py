"""tools.sweep + tools.report end to end on tiny ListOps: two variants, a failed run recorded and
not fatal, an unfinished run resumed from its checkpoint, finished runs skipped, and the report's
tables equal to the runs' results.json. The sweep's runs are real `train.py` subprocesses."""

import csv
import importlib.util
import json
import os

import pytest

import attention
from tools import report, sweep


def _two_variants():
    names = attention.names()
    others = [n for n in names if n != "dense" and "shape" not in attention.get(n).defaults]
    second = "local" if "local" in names else (others[0] if others else None)
    if second is None:
        pytest.skip("needs a second registered variant that runs on ListOps")
    return "dense", second


def _train_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def test_parse_errors_name_what_is_valid():
    with pytest.raises(ValueError, match="valid: dense"):
        sweep.parse_list("dense,nope", ["dense", "local"], "variants")
    assert sweep.parse_list("all", ["dense", "local"], "variants") == ["dense", "local"]
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        sweep.parse_sets(["train.steps"])
    assert sweep.parse_sets(["train.steps=7"]) == [("train.steps", "7")]
    tasks = sweep.registered_tasks()
    assert "listops" in tasks and not {"common", "variants", "loader"} & set(tasks)
    for task in tasks:  # every registered task has its config file, and it builds that task
        spec = importlib.util.spec_from_file_location(task, os.path.join(sweep.REPO_ROOT, "configs",
                                                                         f"{task}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.get_config("tiny").data.task == task


def test_sweep_fail_resume_skip_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # compile fast in the subprocesses
    a, b = _two_variants()
    root = str(tmp_path / "sweep")
    wa, wb = os.path.join(root, "listops", a), os.path.join(root, "listops", b)
    # b's workdir holds a run of another config: train.py refuses it (a real failure mode).
    os.makedirs(wb)
    with open(os.path.join(wb, "config.json"), "w") as f:
        json.dump({"seed": 123}, f)
    base = ["--tasks", "listops", "--root", root, "--arg", "tiny",
            "--set", "train.checkpoint_every=100", "--set", "train.eval_every=100"]

    # 1) Sweep a and b: b fails, a still finishes; the CLI exits 1 (a failure happened).
    rc = sweep.main(base + ["--variants", f"{a},{b}", "--set", "train.steps=4"])
    assert rc == 1
    assert sweep.run_state(wa) == sweep.FINISHED
    assert sweep.run_state(wb) == sweep.FAILED
    with open(os.path.join(wb, "error.txt")) as f:
        assert "holds a run of another config" in f.read()
    status_b = json.load(open(os.path.join(wb, "status.json")))
    assert status_b["status"] == "failed" and status_b["returncode"] != 0
    summary = json.load(open(os.path.join(root, "sweep.json")))
    assert [(r["variant"], r["status"]) for r in summary["runs"]] == [(a, "finished"),
                                                                       (b, "failed")]
    out1 = str(tmp_path / "report1")
    rep = report.build(root, out1)
    assert rep["accuracy"]["cells"][b]["listops"]["status"] == "failed"
    md = open(os.path.join(out1, "accuracy.md")).read()
    assert f"| {b} | fail" in md and "holds a run of another config" in md

    # 2) a loses its results.json (as if killed after its last checkpoint): unfinished, and
    # the next sweep resumes it from step 4 while b (fixed) is retried from scratch.
    os.remove(os.path.join(wa, "results.json"))
    os.remove(os.path.join(wb, "config.json"))
    assert sweep.run_state(wa) == sweep.UNFINISHED
    summary = sweep.sweep(["listops"], [a, b], root, sweep.parse_sets(
        ["train.steps=6", "train.checkpoint_every=100", "train.eval_every=100"]), "tiny",
        echo=lambda *_: None)
    assert [(r["variant"], r["action"], r["status"]) for r in summary] == [
        (a, "resumed", "finished"), (b, "retried", "finished")]
    assert "resumed at step 4" in open(os.path.join(wa, "log.txt")).read()
    assert _train_steps(wa) == [4, 5, 6]  # steps 1-4 were not trained again
    assert _results(wa)["steps"] == 6 and _results(wb)["steps"] == 6
    assert not os.path.exists(os.path.join(wb, "error.txt"))

    # 3) The same command again: everything finished, nothing runs, nothing is rewritten.
    mtimes = {w: os.path.getmtime(os.path.join(w, "results.json")) for w in (wa, wb)}
    summary = sweep.sweep(["listops"], [a, b], root, [("train.steps", "6")], "tiny",
                          echo=lambda *_: None)
    assert [r["action"] for r in summary] == ["skipped", "skipped"]
    assert {w: os.path.getmtime(os.path.join(w, "results.json")) for w in (wa, wb)} == mtimes

    # 4) The report's tables are the runs' results.json.
    out = str(tmp_path / "report")
    rep = report.build(root, out)
    res = {v: _results(w) for v, w in ((a, wa), (b, wb))}
    with open(os.path.join(out, "accuracy.csv")) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    with open(os.path.join(out, "accuracy_params.csv")) as f:
        params = {r["variant"]: int(r["listops"]) for r in csv.DictReader(f)}
    md = open(os.path.join(out, "accuracy.md")).read()
    for v in (a, b):
        acc = round(100 * res[v]["test_accuracy"], 2)
        assert float(rows[v]["listops"]) == pytest.approx(acc)
        assert float(rows[v]["avg"]) == pytest.approx(acc)  # one task: the average is it
        assert params[v] == res[v]["num_params"]
        assert f"{res[v]['num_params']:,}" in md
    assert float(rows["dense"]["listops_published"]) == 36.37  # LRA Table 1, Transformer
    assert f"| dense | {round(100 * res['dense']['test_accuracy'], 2):.2f} (36.37) |" in md
    assert list(rows) == ["dense", b]  # dense first, as the Transformer row of Table 1
    assert "jax " in md and "Machine:" in md


def test_pretrain_then_finetune_is_one_entry(tmp_path, monkeypatch):
    """--pretrain denoise: <workdir>/pretrain trains the denoising objective, then the entry's
    run starts from its encoder (train.init_from); the report gives it its own row."""
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    root = str(tmp_path / "spt")
    args = ["--tasks", "listops", "--variants", "dense", "--root", root, "--arg", "tiny",
            "--seeds", "3", "--pretrain", "denoise", "--pretrain-set", "train.steps=3",
            "--set", "train.steps=2", "--set", "train.eval_every=100",
            "--set", "train.checkpoint_every=100"]
    assert sweep.main(args) == 0
    wdir = os.path.join(root, "listops", "dense", "seed_3")
    pre, fine = _results(os.path.join(wdir, "pretrain")), _results(wdir)
    assert pre["objective"] == "denoise" and pre["steps"] == 3 and pre["config"]["seed"] == 3
    assert fine["objective"] == "classify" and fine["steps"] == 2
    assert fine["init_from"]["init_from"] == os.path.abspath(os.path.join(wdir, "pretrain"))
    assert fine["init_from"]["init_step"] == 3
    summary = sweep.sweep(["listops"], ["dense"], root, [("train.steps", "2")], "tiny",
                          echo=lambda *_: None, seeds=[3], pretrain="denoise")
    assert [r["action"] for r in summary] == ["skipped"]
    rep = report.build(root, str(tmp_path / "out"))
    assert rep["accuracy"]["variants"] == ["dense+denoise"]
    with pytest.raises(ValueError, match="expected comma-separated integers"):
        sweep.parse_seeds("0,x")
