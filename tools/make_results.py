"""Rebuild everything under results/ with one command (documented in docs/results.md).

    python -m tools.make_results                      # all stages, CPU-sized settings
    python -m tools.make_results --only cost,masks    # some stages
    python -m tools.make_results --skip sweep         # tables of the machine, no training

Stages, in order (each writes under --out, default results/):
  cost    tools.cost_table: compiled FLOPs / temp bytes of the attention op, 1K..16K
  masks   tools.masks: the mask of every fixed-pattern variant (results/masks/)
  sweep   tools.sweep: every registered variant on --sweep-tasks (default ListOps `small`,
          the CPU-sized config) into --sweep-root (not committed: checkpoints)
  report  tools.report on --sweep-root: results/accuracy.md (+ csv, params), and the attention
          map of one trained fixed-pattern variant (results/masks/attention_*.png)
  lm      tools.sweep on task lm (`small`, --lm-variants, --lm-set), logs archived (no
          checkpoints) to results/runs/lm_small/, tools.report -> results/lm_cpu.md: bits per
          byte and steps/s per causal variant
  spt     ListOps `small` from scratch vs self-pretraining (denoise) then fine-tuning with the
          same total steps, --spt-seeds per variant: two sweeps (scratch: --spt-steps; SPT:
          half the steps each stage), logs archived to results/runs/spt_listops/, report ->
          results/spt_listops_cpu.md (mean ± std over seeds)
  speed   tools.bench_speed: steps/s and memory of a training step, 1K-4K (last: it is the
          stage most disturbed by other jobs; run it on a quiet machine)
  plots   tools.plots of the JSON files above
File names carry the backend (speed_cpu.md, speed_gpu.md, ...), so CPU and GPU figures sit side
by side. Every table records machine, device, versions and date; when the machine's load
average at the start of the speed stage exceeds --quiet-load, the speed table says it was
shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

STAGES = ("cost", "masks", "sweep", "report", "lm", "spt", "speed", "plots")


# The lm stage's measured settings: 200 steps of the `small` config (context 256), 64 KB per
# evaluation split, one validation pass at the end.
LM_SETS = ["train.steps=200", "train.eval_every=200", "train.checkpoint_every=200",
           "train.log_every=25", "data.eval_bytes=65536"]


def spt_roots(root: str) -> tuple[str, str]:
    """(from-scratch sweep root, SPT sweep root) of the spt stage."""
    return os.path.join(root, "scratch"), os.path.join(root, "spt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results")
    p.add_argument("--only", default=",".join(STAGES), help=f"stages among {', '.join(STAGES)}")
    p.add_argument("--skip", default="", help="stages to leave out")
    p.add_argument("--variants", default="all", help="variants for cost/speed/sweep")
    p.add_argument("--cost-lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--speed-lengths", default="1024,2048,3072,4096")
    p.add_argument("--speed-model", default="small", help="lra | small (see tools.bench_speed)")
    p.add_argument("--speed-batch", type=int, default=4)
    p.add_argument("--speed-max-memory-gb", type=float, default=12.0)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--quiet-load", type=float, default=1.0,
                   help="load average above which the speed table says the machine was shared")
    p.add_argument("--note", default="", help="extra note for the speed table header")
    p.add_argument("--sweep-root", default="workdirs/results_sweep")
    p.add_argument("--sweep-tasks", default="listops")
    p.add_argument("--sweep-arg", default="small")
    p.add_argument("--sweep-set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--lm-root", default="workdirs/lm_small")
    p.add_argument("--lm-variants", default="dense,local,sparse,bigbird,linear,performer")
    p.add_argument("--lm-set", action="append", metavar="FIELD=VALUE", default=None,
                   help="overrides of the lm runs (default: the measured settings)")
    p.add_argument("--spt-root", default="workdirs/spt_listops")
    p.add_argument("--spt-variants", default="dense,local,performer")
    p.add_argument("--spt-seeds", default="0,1,2")
    p.add_argument("--spt-steps", type=int, default=300,
                   help="total steps per run: scratch trains them all, SPT half + half")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = [s for s in only + sorted(skip) if s not in STAGES]
    if bad:
        raise ValueError(f"make_results: unknown stage(s) {bad}; valid: {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in only and s not in skip]

    import jax

    from tools import bench_speed, cost_table, masks, plots, report, sweep

    backend = jax.default_backend()
    out = a.out
    os.makedirs(out, exist_ok=True)
    failed = False
    for stage in stages:
        t0 = time.time()
        print(f"== {stage}", flush=True)
        if stage == "cost":
            cost_table.main(["--out", out, "--variants", a.variants,
                             "--lengths", a.cost_lengths])
        elif stage == "masks":
            masks.main(["--out", os.path.join(out, "masks")])
        elif stage == "sweep":
            args = ["--tasks", a.sweep_tasks, "--variants", a.variants, "--root", a.sweep_root,
                    "--arg", a.sweep_arg]
            for item in a.sweep_set:
                args += ["--set", item]
            failed |= sweep.main(args) != 0
        elif stage == "report":
            if not os.path.isdir(a.sweep_root):
                print(f"no sweep root {a.sweep_root!r}: run the sweep stage first; skipped")
                continue
            rep = report.build(a.sweep_root, out, "accuracy",
                               title="Accuracy (LRA Table 1 layout), "
                                     f"`{a.sweep_arg or 'full'}` configs")
            finished = [r for r in rep["runs"] if r["status"] == "finished"]
            pattern = [r for r in finished if masks.pattern_of(r["variant"]) is not None]
            pick = ([r for r in pattern if r["variant"] == "local"] or pattern or finished)[:1]
            for r in pick:
                masks.main(["--workdir", r["workdir"], "--out", os.path.join(out, "masks")])
        elif stage == "lm":
            sets = a.lm_set if a.lm_set is not None else LM_SETS
            args = ["--tasks", "lm", "--variants", a.lm_variants, "--root", a.lm_root,
                    "--arg", "small"]
            for item in sets:
                args += ["--set", item]
            failed |= sweep.main(args) != 0
            report.main(["--root", a.lm_root, "--archive", os.path.join(out, "runs"),
                         "--out", out, "--name", "lm_cpu", "--no-published",
                         "--title", "Byte-level LM on the Python standard library (task lm)"])
        elif stage == "spt":
            roots = spt_roots(a.spt_root)
            half = a.spt_steps // 2
            common = ["--tasks", "listops", "--variants", a.spt_variants, "--arg", "small",
                      "--seeds", a.spt_seeds, "--set", "train.eval_every=100000",
                      "--set", "train.checkpoint_every=100000"]
            failed |= sweep.main(common + ["--root", roots[0], "--set",
                                           f"train.steps={a.spt_steps}", "--set",
                                           f"train.warmup_steps={a.spt_steps // 10}"]) != 0
            failed |= sweep.main(common + [
                "--root", roots[1], "--set", f"train.steps={half}",
                "--set", f"train.warmup_steps={half // 10}", "--pretrain", "denoise",
                ]) != 0
            report.main(["--root", ",".join(roots),
                         "--archive", os.path.join(out, "runs", "spt_listops"),
                         "--out", out, "--name", "spt_listops_cpu",
                         "--title", "ListOps small: from scratch vs self-pretraining (SPT)"])
        elif stage == "speed":
            bench_speed.main(["--quiet-load", str(a.quiet_load), "--out", out,
                              "--variants", a.variants,
                              "--lengths", a.speed_lengths, "--model", a.speed_model,
                              "--batch", str(a.speed_batch),
                              "--max-memory-gb", str(a.speed_max_memory_gb),
                              "--repeats", str(a.speed_repeats), "--note", a.note])
        elif stage == "plots":
            args = ["--out", out]
            for flag, stem in (("--speed", f"speed_{backend}"), ("--cost", f"cost_{backend}"),
                               ("--accuracy", "accuracy")):
                path = os.path.join(out, f"{stem}.json")
                if os.path.exists(path):
                    args += [flag, path]
            if len(args) > 2:
                plots.main(args)
        print(f"== {stage} done in {time.time() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from tools.sweep import exit_on_sigterm
    exit_on_sigterm()
    sys.exit(main())
