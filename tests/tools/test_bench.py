"""tools.bench_speed and tools.cost_table on tiny shapes: memory and FLOPs grow as the variant's
complexity says, ratios are against dense of the same run, tables carry the environment."""

import csv
import os

import jax
import pytest

import attention
from tools import bench_speed, cost_table

TINY = {"num_layers": 1, "num_heads": 2, "emb_dim": 16, "qkv_dim": 16, "mlp_dim": 32}


pytestmark = pytest.mark.usefixtures("fast_compile")


def test_fit_exponent_recovers_a_power_law():
    n = [1024, 2048, 4096, 8192]
    assert cost_table.fit_exponent(n, [3 * x ** 1.5 for x in n]) == pytest.approx(1.5)
    assert cost_table.fit_exponent(n, [None, 0, 5.0, None]) is None  # one usable point


def test_cost_table_exponents_follow_the_complexity(tmp_path):
    names = ["dense"] + [n for n in ("local", "blockwise") if n in attention.VARIANTS]
    lengths = [128, 256, 512]
    rows = cost_table.run(names, lengths, heads=2, head_dim=8, task="listops",
                          echo=lambda *_: None)
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["forward_flops_exponent"] == pytest.approx(2.0, abs=0.05)
    assert by["dense"]["forward_temp_bytes_exponent"] == pytest.approx(2.0, abs=0.1)
    for n in lengths:  # q k^T and weights @ v: 2 * (B H n n D) multiply-adds each
        assert by["dense"]["cells"][n]["forward"]["matmul_flops"] == 2 * 2 * 2 * n * n * 8
    if "local" in by:
        assert by["local"]["forward_flops_exponent"] == pytest.approx(1.0, abs=0.1)
    if "blockwise" in by:  # quadratic work in a loop: XLA counts the body once, we do not
        fwd = by["blockwise"]["cells"][512]["forward"]
        assert fwd["has_loop"] and fwd["flops"] < 0.5 * fwd["matmul_flops"]
        assert by["blockwise"]["forward_matmul_flops_exponent"] == pytest.approx(2.0, abs=0.1)
    result = {"environment": {"jax": jax.__version__, "cpu": "test"}, "rows": rows,
              "settings": {"lengths": lengths, "batch": 1, "heads": 2, "head_dim": 8,
                           "task": "listops", "grad": False}}
    cost_table.write_tables(result, str(tmp_path), "cost")
    md = open(tmp_path / "cost.md").read()
    assert f"jax {jax.__version__}" in md and "| dense | O(n^2) |" in md
    with open(tmp_path / "cost.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(names) * len(lengths)
    d128 = next(r for r in csv_rows if r["variant"] == "dense" and r["length"] == "128")
    assert float(d128["forward_flops"]) == by["dense"]["cells"][128]["forward"]["flops"]


def test_speed_cells_ratios_memory_cap_and_table(tmp_path):
    other = "local" if "local" in attention.VARIANTS else "dense"
    kw = dict(batch=2, model="small", model_overrides=TINY, repeats=1, target_seconds=0.05)
    # Round-robin timing of a length's variants; a failing variant is a recorded entry.
    d64, o64, bad = bench_speed.measure_length_round_robin(
        ["dense", other, "no_such_variant"], 64, **kw)
    assert "no_such_variant" in bad["error"] and "steps_per_sec" not in bad
    assert d64["steps_per_sec"] > 0 and d64["steps_timed"] >= 1
    assert d64["model"]["emb_dim"] == 16 and d64["num_params"] > 0
    # Memory: the compiled step's buffers (donated state counted once).
    assert d64["compiled_bytes"] == (d64["argument_bytes"] + d64["output_bytes"]
                                     + d64["temp_bytes"] - d64["alias_bytes"])
    assert d64["alias_bytes"] > 0  # the train state is donated
    # A cell over the memory cap is sized but not run.
    assert bench_speed.over_cap(d64, d64["compiled_bytes"] / 2**30 * 0.99)
    assert bench_speed.over_cap(d64, d64["compiled_bytes"] / 2**30 * 1.01) is None
    skipped = {"variant": "dense", "length": 128, "batch": 2, "compiled_bytes": 10 * 2**20,
               "skipped": bench_speed.over_cap({"compiled_bytes": 10 * 2**20}, 1e-3)}
    cells = [d64, skipped, o64]
    variants = list(dict.fromkeys(["dense", other]))
    tab = bench_speed.table(cells, [64, 128], variants)
    rows = {r["variant"]: r for r in tab["rows"]}
    assert rows["dense"]["speed"][64]["vs_dense"] == pytest.approx(1.0)
    want = o64["steps_per_sec"] / d64["steps_per_sec"]
    assert rows[other]["speed"][64]["vs_dense"] == pytest.approx(want)
    assert rows["dense"]["speed"][128]["steps_per_sec"] is None
    assert rows["dense"]["memory"][64]["gb"] == pytest.approx(d64["compiled_bytes"] / 2**30)
    result = {"environment": {"jax": jax.__version__, "note": "shared machine"},
              "device_memory": False, "cells": cells, "table": tab,
              "settings": {"batch": 2, "model_desc": "tiny", "repeats": 1,
                           "config_source": "test"}}
    bench_speed.write_tables(result, str(tmp_path), "speed")
    md = open(os.path.join(tmp_path, "speed.md")).read()
    assert "Note: shared machine" in md and "| Steps/s 64 | Steps/s 128 |" in md
    dense_row = next(line for line in md.splitlines() if line.startswith("| dense |"))
    assert dense_row.split("|")[3].strip() == "skip"  # 128: over the cap
    if other != "dense":
        assert f"({want:.2f}x)" in md
    with open(os.path.join(tmp_path, "speed.csv")) as f:
        assert len(list(csv.DictReader(f))) == 3


def test_pipeline_bench_synthetic_aan_is_release_format(tmp_path):
    """The benchmark's synthetic retrieval rows parse with the release reader at full length."""
    from lra import retrieval
    from tools import bench_pipeline
    bench_pipeline.write_synthetic_aan(str(tmp_path), max_len=50, per_split=6)
    files = retrieval.find_files(str(tmp_path))
    tokens, lengths, labels = retrieval.read_tsv(files["train"], max_len=50)
    assert tokens.shape == (6, 2, 50) and (lengths == 50).all()
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
