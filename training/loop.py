"""The one training loop for every task and variant: train_and_evaluate(config, workdir).

validate the config -> build task, model, optimizer, jitted steps, and trace the train step
once (every value is checked before the workdir is touched) -> open the workdir (restore the
newest good checkpoint, compare the run's identity, write config.json) -> train, log, evaluate,
checkpoint -> test -> results.json.

Exact resume: the state (model, optimizer, step) is checkpointed, batches are a function of
(seed, step) and dropout keys of (seed, step), so a resumed run ends where an uninterrupted one
would. A step whose loss, gradient or updated state is non-finite changes nothing (selected on
device), and the host stops the run naming the step at its next check (every log step and
before every checkpoint and evaluation), so nothing non-finite is ever saved or reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lra
from lra import pipeline
from models import build_model, pop_aux_losses
from training import objectives, optim
from training.checkpoint import Checkpoints
from training.init_from import load_pretrained
from training.metrics import MetricsWriter, NonFiniteError, TrainMonitor, write_json
from training.validate import ConfigError, validate_config

__all__ = ["train_and_evaluate", "setup", "NonFiniteError", "ConfigError"]

# Fields that may differ between a run and its resumption: they change how the run is watched,
# not what it computes.
FREE_FIELDS = {"train.steps", "train.log_every", "train.eval_every", "train.eval_examples",
               "train.checkpoint_every", "train.keep_checkpoints", "train.distributed",
               "train.coordinator_address", "train.num_processes", "train.process_id",
               "train.change_on_resume", "train.seq_shards", "data.workers",
               "data.eval_batch_size", "data.cache_dir", "data.data_dir", "attention.impl"}
# Fields a stopped run may continue with on purpose (train.change_on_resume=True); the change
# is recorded in metrics.jsonl at the step where it happened.
SAFE_FIELDS = {"train.learning_rate", "train.schedule", "train.warmup_steps", "train.grad_clip"}


def init_distributed(train) -> None:
    """jax.distributed.initialize from train.coordinator_address / num_processes / process_id,
    each left to JAX's own detection (SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS)
    when unset. On CPU hosts, collectives across processes go through gloo."""
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if train.get("coordinator_address", ""):
        kwargs["coordinator_address"] = train.coordinator_address
    if train.get("num_processes", 0):
        kwargs["num_processes"] = train.num_processes
    if train.get("process_id", -1) >= 0:
        kwargs["process_id"] = train.process_id
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def make_mesh(seq_shards: int = 1) -> Mesh:
    """Devices as a (data, seq) grid: batches split over `data`, one sequence over `seq`."""
    devices = np.asarray(jax.devices())
    if devices.size % seq_shards:
        raise ConfigError(f"train.seq_shards={seq_shards} must divide the number of devices "
                          f"({devices.size})")
    return Mesh(devices.reshape(-1, seq_shards), ("data", "seq"))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(graphdef, seed: int, objective="classify"):
    """objective: a name in objectives.OBJECTIVES or the objective function itself."""
    loss_of = objective if callable(objective) else objectives.get(objective)

    def train_step(state, batch, step):
        model, opt = nnx.merge(graphdef, state)
        key = jax.random.fold_in(jax.random.key(seed), step)

        def loss_fn(model):
            out = loss_of(model, batch, train=True, rngs=nnx.Rngs(dropout=key))
            count = jnp.maximum(out["count"].sum(), 1.0)
            loss = out["loss_sum"].sum() / count
            # auxiliary losses the model left (e.g. the Compressive Transformer's attention
            # reconstruction, models/recurrent.py): weight x value added, value logged
            aux = pop_aux_losses(model)
            total = loss + sum(w * v for v, w in aux.values())
            logged = {k: v for k, (v, _) in aux.items()}
            return total, (loss, out["correct"].sum() / count, logged)

        (total, (loss, acc, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        gnorm = optax.tree.norm(grads)
        before = nnx.state((model, opt))
        opt.update(model, grads)
        after = nnx.state((model, opt))
        grads_finite = jnp.isfinite(total) & jnp.isfinite(gnorm)
        finite = grads_finite & _all_finite(after)
        # A non-finite step changes nothing; the host stops the run at its next check.
        new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), after, before)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": gnorm, "finite": finite,
                   "grads_finite": grads_finite, "aux": aux,
                   "param_norm": optax.tree.norm(nnx.state(model, nnx.Param))}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, objective="classify"):
    loss_of = objective if callable(objective) else objectives.get(objective)

    def eval_step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        out = loss_of(model, batch, train=False, rngs=None)
        w = batch["weight"]
        return {k: jnp.sum(out[k] * w) for k in ("loss_sum", "correct", "count")}

    return eval_step


def evaluate(eval_step, state, source, batch_size, sharding, limit=None, workers=1):
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in pipeline.eval_batches(source, batch_size, limit=limit, workers=workers):
        out = jax.device_get(eval_step(state, jax.device_put(batch, sharding)))
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n,
            "examples": int(totals["count"])}


def environment() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "platform": platform.platform(),
            "python": platform.python_version(), "processor": platform.processor()}


@dataclasses.dataclass
class Setup:
    """What a run is made of: the task, the model and optimizer state, the jitted steps."""

    task: lra.Task
    mesh: Mesh
    graphdef: Any
    state: Any                      # nnx.State of (model, optimizer), replicated on the mesh
    data_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    num_params: int
    lr: Callable                    # the learning-rate schedule (for the logs)
    init: dict | None = None        # train.init_from: where the encoder came from


def model_and_optimizer(config, task):
    """The model the config's objective trains on `task` (objectives.model_spec) and its
    optimizer, freshly initialised from config.seed."""
    model = build_model(config, num_classes=task.num_classes, vocab_size=task.vocab_size,
                        max_len=task.max_len, pair=task.pair, grid_shape=task.grid_shape,
                        seed=config.seed,
                        **objectives.model_spec(config.train.get("objective", "classify")))
    return model, nnx.Optimizer(model, optim.optimizer(config.train), wrt=nnx.Param)


def initial_state(build: Callable, sharding: NamedSharding, *, jit: bool | None = None):
    """(graphdef, abstract, state) of the (model, optimizer) that build() makes.

    Shapes come first: nnx.eval_shape traces build without allocating anything (a bad
    hyperparameter fails here), and the parameter count is read from that abstract state.
    The state is then made in `sharding`. jit=None picks by backend: on an accelerator one
    jitted init writes every array straight into its sharding (big_vision's habit); on the CPU
    the init runs op by op and is put there: compiling the whole init takes longer here than
    running it, and op by op gives the values every committed figure trained from (under jit,
    XLA folds the scale of the normal inits into the sampler, which moves their last bits;
    tests/test_train.py holds the two within 1e-7)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    if jit is None:
        jit = jax.default_backend() != "cpu"
    if jit:
        shardings = jax.tree.map(lambda _: sharding, abstract)
        state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
    else:
        state = jax.device_put(nnx.split(build())[1], sharding)
    return graphdef, abstract, state


def setup(config) -> Setup:
    """Builds task, model, optimizer and the jitted steps; writes nothing to the workdir."""
    if config.train.distributed:
        init_distributed(config.train)
    task = lra.get_task(config.data)
    mesh = make_mesh(config.train.get("seq_shards", 1))
    groups = mesh.shape["data"]
    for field in ("batch_size", "eval_batch_size"):
        if config.data[field] % groups:
            raise ConfigError(f"data.{field}={config.data[field]} must be divisible by the "
                              f"number of data-parallel groups ({groups} = devices / "
                              f"train.seq_shards)")
    objective = config.train.get("objective", "classify")
    objectives.check_task(objective, task, config.attention.name)
    replicated = NamedSharding(mesh, P())
    graphdef, abstract, state = initial_state(lambda: model_and_optimizer(config, task),
                                              replicated)
    init = None
    if config.train.get("init_from", ""):
        model, _ = nnx.merge(graphdef, state)
        init = load_pretrained(model, config.train.init_from, config, task=task,
                               build_state=lambda c, t: nnx.state(model_and_optimizer(c, t)))
        opt = nnx.Optimizer(model, optim.optimizer(config.train), wrt=nnx.Param)
        state = jax.device_put(nnx.split((model, opt))[1], replicated)
    objective = objectives.get(objective, config)
    return Setup(task=task, mesh=mesh, graphdef=graphdef, state=state, init=init,
                 data_sharding=NamedSharding(mesh, P("data")),
                 train_step=jax.jit(make_train_step(graphdef, config.seed, objective),
                                    donate_argnums=0),
                 eval_step=jax.jit(make_eval_step(graphdef, objective)),
                 num_params=int(sum(x.size for x in jax.tree.leaves(
                     abstract[0].filter(nnx.Param)))),
                 lr=optim.schedule(config.train))


def _sequence_mesh(mesh: Mesh):
    """The mesh in context while steps are traced when it splits sequences (the attention
    layers read it, attention/context_parallel.py); nothing otherwise."""
    return jax.set_mesh(mesh) if mesh.shape["seq"] > 1 else contextlib.nullcontext()


def trace_train_step(s: Setup, batch_size: int) -> None:
    """Traces the train step on abstract inputs: a variant's hyperparameters and the shapes of
    everything are checked (ValueError) without computing anything. The inputs carry the
    shardings of the real ones, so the first step reuses this trace."""
    example = s.task.splits["train"][0]
    batch = {k: jax.ShapeDtypeStruct((batch_size,) + np.shape(v), np.asarray(v).dtype,
                                     sharding=s.data_sharding) for k, v in example.items()}
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         s.state)
    jax.eval_shape(s.train_step, state, batch, jax.ShapeDtypeStruct((), jnp.int32))


# ---------------------------------------------------------------------------------------------
# The workdir: run identity, restore with fall-back, config.json.

def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, config, where: str) -> dict:
    """{field: {"from", "to"}} of the safe fields that changed; ConfigError when any other field
    differs, or a safe one does without train.change_on_resume=True. Fields the saved config
    lacks (added to the code since) take their new values."""
    old, new = _flat(saved), _flat(json.loads(config.to_json()))
    diff = sorted(k for k in old if k in new and old[k] != new[k] and k not in FREE_FIELDS)
    refused = [k for k in diff if k not in SAFE_FIELDS]
    shown = lambda keys: ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys[:8])  # noqa: E731
    if refused:
        raise ConfigError(
            f"{where} holds a run of another config (differs in {shown(refused)}"
            f"{' ...' if len(refused) > 8 else ''}). Use a new --workdir, or the same config "
            f"to resume.")
    if diff and not new.get("train.change_on_resume", False):
        raise ConfigError(
            f"{where} holds this run with other training settings ({shown(diff)}). To continue "
            f"it with the new values, add --config.train.change_on_resume=True (the change is "
            f"recorded in metrics.jsonl); or use a new --workdir.")
    return {k: {"from": old[k], "to": new[k]} for k in diff}


@dataclasses.dataclass
class Resume:
    step: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"accuracy": -1.0, "step": None})
    changes: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        nnx.to_pure_dict(state))


def load_checkpoint(workdir: str, s: Setup) -> int:
    """Restores the newest good checkpoint of a train.py workdir into s.state (read only: a
    damaged newer one is skipped, not moved). Returns its step; ValueError if there is none."""
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    try:
        restored = ckpt.restore_latest_good(_abstract(s.state))
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')!r}")
    nnx.replace_by_pure_dict(s.state, restored.state)
    return restored.step


def open_workdir(config, workdir: str, s: Setup, ckpt: Checkpoints) -> Resume:
    """Restores the newest good checkpoint into s.state (checking the run's identity against
    it, or against config.json if there is none), sets damaged ones aside, writes config.json."""
    config_path = os.path.join(workdir, "config.json")
    resume = Resume()
    check = lambda meta: resume.changes.update(  # noqa: E731
        config_changes(meta["config"], config, f"workdir {workdir!r} (checkpoint config)"))
    restored = ckpt.restore_latest_good(_abstract(s.state), check_meta=check)
    if restored is None and os.path.exists(config_path):
        with open(config_path) as f:
            resume.changes = config_changes(json.load(f), config, f"workdir {workdir!r}")
    if ckpt.removed_tmp:
        resume.notes.append(f"removed unfinished checkpoint folders {ckpt.removed_tmp}")
    if restored is not None:
        nnx.replace_by_pure_dict(s.state, restored.state)
        resume.step = int(restored.meta["data_position"])
        resume.best = restored.meta.get("best", resume.best)
        for (step, path, why), dest in zip(restored.damaged,
                                           ckpt.set_aside([d[0] for d in restored.damaged])):
            resume.notes.append(f"checkpoint {path} is damaged ({why}); moved to {dest}, "
                                f"resuming from step {restored.step}")
    if jax.process_index() == 0:  # multi-process runs: one writer
        os.makedirs(workdir, exist_ok=True)
        write_json(config_path, json.loads(config.to_json()))
    return resume


# ---------------------------------------------------------------------------------------------
# The loop.

def train_and_evaluate(config, workdir: str) -> dict:
    """Trains config in workdir (resuming from its newest good checkpoint); returns results."""
    t_start = time.time()
    validate_config(config)
    s = setup(config)
    with _sequence_mesh(s.mesh):
        trace_train_step(s, config.data.batch_size)
        ckpt = Checkpoints(os.path.join(workdir, "checkpoints"),
                           keep=config.train.keep_checkpoints)
        try:
            resume = open_workdir(config, workdir, s, ckpt)
            writer = MetricsWriter(workdir, config.train.steps, resume.step)
            try:
                results = _run(config, s, ckpt, writer, resume)
            finally:
                writer.close()
        finally:
            ckpt.close()
    results.update(wall_time_sec=time.time() - t_start, environment=environment(),
                   config=json.loads(config.to_json()))
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "results.json"), results)
    if "test_bits_per_byte" in results:
        print(f"test bits per byte {results['test_bits_per_byte']:.4f} (validation "
              f"{results['validation_bits_per_byte']:.4f})", flush=True)
    print(f"test accuracy {results['test_accuracy']:.4f} (majority class "
          f"{results['test_majority_rate']:.4f}), best validation "
          f"{results['best_val_accuracy']:.4f} at step {results['best_val_step']}", flush=True)
    return results


def _run(config, s: Setup, ckpt: Checkpoints, writer: MetricsWriter, resume: Resume) -> dict:
    tcfg, dcfg, task = config.train, config.data, s.task
    start, best, state = resume.step, resume.best, s.state
    writer.echo(f"task {task.name} ({task.info.get('origin', '')}), attention "
                f"{config.attention.name}, {s.num_params:,} params, devices "
                f"{len(jax.devices())} x {jax.default_backend()}"
                + (f", resumed at step {start}" if start else ""))
    for note in resume.notes:
        writer.echo(note)
    if resume.changes:
        writer.write({"step": start, "split": "resume", "changes": resume.changes})
    monitor = TrainMonitor(writer, s.lr, dcfg.batch_size,
                           lambda: (ckpt.steps() or [None])[-1])
    evaluate_on = lambda split, limit=None: evaluate(  # noqa: E731
        s.eval_step, state, task.splits[split], dcfg.eval_batch_size, s.data_sharding,
        limit=limit, workers=dcfg.workers)
    batches = pipeline.train_batches(task.splits["train"], dcfg.batch_size, seed=config.seed,
                                     start_step=start, workers=dcfg.workers)
    step = start
    for step in range(start + 1, tcfg.steps + 1):
        batch = jax.device_put(next(batches), s.data_sharding)
        state, metrics = s.train_step(state, batch, jnp.asarray(step - 1, jnp.int32))
        monitor.add(metrics)
        last = step == tcfg.steps
        evaluating = step % tcfg.eval_every == 0 and not last
        saving = step % tcfg.checkpoint_every == 0 or last
        if step % tcfg.log_every == 0 or last or evaluating or saving:
            monitor.check(step)
        if evaluating:
            ev = evaluate_on("validation", tcfg.eval_examples or None)
            writer.write({"step": step, "split": "validation", **ev}, prefix="validation")
            if ev["accuracy"] > best["accuracy"]:
                best = {"accuracy": ev["accuracy"], "step": step}
        if saving:
            ckpt.save(step, nnx.to_pure_dict(state), {
                "step": step, "data_position": step, "best": best,
                "config": json.loads(config.to_json())})
        if evaluating or saving:
            monitor.restart_clock()
    monitor.check(step)
    final = {split: evaluate_on(split) for split in ("validation", "test")}
    for split, ev in final.items():
        writer.write({"step": step, "split": split, **ev}, prefix=split)
    if final["validation"]["accuracy"] > best["accuracy"]:
        best = {"accuracy": final["validation"]["accuracy"], "step": step}
    return {"task": task.name, "attention": config.attention.name, "steps": step,
            "test_accuracy": final["test"]["accuracy"], "test_loss": final["test"]["loss"],
            "validation_accuracy": final["validation"]["accuracy"],
            "best_val_accuracy": best["accuracy"], "best_val_step": best["step"],
            "test_majority_rate": task.majority_rate("test"), "num_params": s.num_params,
            "objective": tcfg.get("objective", "classify"), **_lm_results(config, final),
            **({"init_from": s.init} if s.init else {}), "task_info": task.info}


def _lm_results(config, final: dict) -> dict:
    """Bits per byte (per token: byte-level tasks) of a causal_lm run: mean loss / ln 2."""
    if config.train.get("objective", "classify") != "causal_lm":
        return {}
    return {f"{split}_bits_per_byte": final[split]["loss"] / float(np.log(2.0))
            for split in ("validation", "test")}
