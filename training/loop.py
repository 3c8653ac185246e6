"""The one training loop for every task and variant: train_and_evaluate(config, workdir).

config -> task (lra) -> model (models) -> optax -> jit step (donated state, batch sharded over
all devices) -> validation evals -> orbax checkpoints -> test eval -> results.json.
Exact resume: the state (model, optimizer, step) is checkpointed, batches are a function of
(seed, step) and dropout keys of (seed, step), so a resumed run ends where an uninterrupted one
would. A non-finite loss or gradient skips that update, and the host stops the run naming the
step at the next check (every log step and before every checkpoint): no NaN is ever saved.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lra
from lra import pipeline
from models import build_model, count_params
from training import optim
from training.checkpoint import Checkpoints
from training.metrics import MetricsWriter

# Fields that may differ between a run and its resumption (everything else must match).
RESUMABLE_FIELDS = {"train.steps", "train.log_every", "train.eval_every", "data.workers",
                    "train.checkpoint_every", "train.keep_checkpoints", "data.eval_batch_size",
                    "data.cache_dir", "data.data_dir"}


class NonFiniteError(FloatingPointError):
    pass


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_workdir(workdir: str, config) -> None:
    """A workdir holding a run of another config is an error; nothing is overwritten."""
    path = os.path.join(workdir, "config.json")
    new = _flat(json.loads(config.to_json()))
    if os.path.exists(path):
        with open(path) as f:
            old = _flat(json.load(f))
        diff = sorted(k for k in set(old) | set(new)
                      if old.get(k) != new.get(k) and k not in RESUMABLE_FIELDS)
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
            raise ValueError(
                f"workdir {workdir!r} holds a run of another config (differs in {shown}"
                f"{' ...' if len(diff) > 8 else ''}). Use a new --workdir, or the same config "
                f"to resume.")
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(path + ".tmp", path)


def make_mesh():
    return Mesh(np.asarray(jax.devices()), ("data",))


def _loss_and_metrics(model, batch, train, rngs):
    logits = model(batch["inputs"], batch["mask"], train=train, rngs=rngs)
    labels = batch["label"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return losses, correct


def make_train_step(graphdef, seed: int):
    def train_step(state, batch, step):
        model, opt = nnx.merge(graphdef, state)
        key = jax.random.fold_in(jax.random.key(seed), step)

        def loss_fn(model):
            rngs = nnx.Rngs(dropout=key)
            losses, correct = _loss_and_metrics(model, batch, True, rngs)
            return losses.mean(), correct.mean()

        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        before = nnx.state((model, opt))
        opt.update(model, grads)
        after = nnx.state((model, opt))
        # A non-finite step changes nothing; the host stops the run at its next check.
        new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), after, before)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": gnorm, "finite": finite,
                   "param_norm": optax.tree.norm(nnx.state(model, nnx.Param))}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    def eval_step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        losses, correct = _loss_and_metrics(model, batch, False, None)
        w = batch["weight"]
        return {"loss_sum": jnp.sum(losses * w), "correct": jnp.sum(correct * w),
                "count": jnp.sum(w)}

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


def setup(config, workdir: str | None = None):
    """Builds task, model, optimizer and the jitted steps. Returns a dict of the pieces."""
    if config.train.distributed:
        jax.distributed.initialize()
    task = lra.get_task(config.data)
    mesh = make_mesh()
    ndev = mesh.devices.size
    for field in ("batch_size", "eval_batch_size"):
        if config.data[field] % ndev:
            raise ValueError(f"data.{field}={config.data[field]} must be divisible by the "
                             f"number of devices ({ndev})")
    model = build_model(config, num_classes=task.num_classes, vocab_size=task.vocab_size,
                        max_len=task.max_len, pair=task.pair, grid_shape=task.grid_shape,
                        seed=config.seed)
    opt = nnx.Optimizer(model, optim.optimizer(config.train), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    state = jax.device_put(state, replicated)
    train_step = jax.jit(make_train_step(graphdef, config.seed), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef))
    return dict(task=task, mesh=mesh, model=model, graphdef=graphdef, state=state,
                replicated=replicated, data_sharding=data_sharding, train_step=train_step,
                eval_step=eval_step, num_params=count_params(model),
                lr=optim.schedule(config.train))


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains config in workdir (resuming from its latest checkpoint); returns results."""
    check_workdir(workdir, config)
    t_start = time.time()
    s = setup(config)
    task, state = s["task"], s["state"]
    tcfg, dcfg = config.train, config.data
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
    start = 0
    best = {"accuracy": -1.0, "step": None}
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding),
                                nnx.to_pure_dict(state))
        restored, meta = ckpt.restore(latest, abstract)
        nnx.replace_by_pure_dict(state, restored)
        start = int(meta["data_position"])
        best = meta.get("best", best)
    writer = MetricsWriter(workdir, tcfg.steps, start)
    writer.echo(f"task {task.name} ({task.info.get('origin', '')}), attention "
                f"{config.attention.name}, {s['num_params']:,} params, devices "
                f"{len(jax.devices())} x {jax.default_backend()}"
                + (f", resumed at step {start}" if start else ""))

    train_src = task.splits["train"]
    batches = pipeline.train_batches(train_src, dcfg.batch_size, seed=config.seed,
                                     start_step=start, workers=dcfg.workers)
    pending, t_log, steps_since = [], time.time(), 0

    def check_and_log(step):
        nonlocal pending, t_log, steps_since
        if not pending:
            return
        rows = jax.device_get(pending)
        for i, m in enumerate(rows):
            if not bool(m["finite"]):
                bad = step - len(rows) + i + 1
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {bad} (loss {float(m['loss'])}, grad "
                    f"norm {float(m['grad_norm'])}); the run is stopped, the last checkpoint is "
                    f"from before it. Lower train.learning_rate or set train.grad_clip.")
        dt = time.time() - t_log
        row = {"step": step, "split": "train"}
        for k in ("loss", "accuracy", "grad_norm", "param_norm"):
            row[k] = float(np.mean([float(m[k]) for m in rows]))
        row["learning_rate"] = float(s["lr"](step - 1))
        row["steps_per_sec"] = steps_since / dt
        row["examples_per_sec"] = steps_since * dcfg.batch_size / dt
        writer.write(row)
        pending, t_log, steps_since = [], time.time(), 0

    def save(step):
        meta = {"step": step, "data_position": step, "best": best,
                "config": json.loads(config.to_json())}
        ckpt.save(step, nnx.to_pure_dict(state), meta)

    step = start
    try:
        for step in range(start + 1, tcfg.steps + 1):
            batch = jax.device_put(next(batches), s["data_sharding"])
            state, metrics = s["train_step"](state, batch, jnp.asarray(step - 1, jnp.int32))
            pending.append(metrics)
            steps_since += 1
            writer.advance(1)
            last = step == tcfg.steps
            if step % tcfg.log_every == 0 or last or step % tcfg.checkpoint_every == 0 \
                    or step % tcfg.eval_every == 0:
                check_and_log(step)
            if step % tcfg.eval_every == 0 and not last:
                ev = evaluate(s["eval_step"], state, task.splits["validation"],
                              dcfg.eval_batch_size, s["data_sharding"],
                              limit=tcfg.eval_examples or None, workers=dcfg.workers)
                writer.write({"step": step, "split": "validation", **ev}, prefix="validation")
                if ev["accuracy"] > best["accuracy"]:
                    best = {"accuracy": ev["accuracy"], "step": step}
            if step % tcfg.checkpoint_every == 0 or last:
                save(step)
            if pending == [] and steps_since == 0:
                t_log = time.time()  # evals and saves do not count against steps/s
        check_and_log(step)
        final = {}
        for split in ("validation", "test"):
            final[split] = evaluate(s["eval_step"], state, task.splits[split],
                                    dcfg.eval_batch_size, s["data_sharding"],
                                    workers=dcfg.workers)
            writer.write({"step": step, "split": split, **final[split]}, prefix=split)
        if final["validation"]["accuracy"] > best["accuracy"]:
            best = {"accuracy": final["validation"]["accuracy"], "step": step}
    finally:
        writer.close()
        ckpt.close()
    results = {
        "task": task.name, "attention": config.attention.name, "steps": step,
        "test_accuracy": final["test"]["accuracy"], "test_loss": final["test"]["loss"],
        "validation_accuracy": final["validation"]["accuracy"],
        "best_val_accuracy": best["accuracy"], "best_val_step": best["step"],
        "test_majority_rate": task.majority_rate("test"),
        "num_params": s["num_params"], "wall_time_sec": time.time() - t_start,
        "task_info": task.info, "environment": environment(),
        "config": json.loads(config.to_json()),
    }
    with open(os.path.join(workdir, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(workdir, "results.json.tmp"), os.path.join(workdir, "results.json"))
    writer_echo = (f"test accuracy {results['test_accuracy']:.4f} (majority class "
                   f"{results['test_majority_rate']:.4f}), best validation "
                   f"{best['accuracy']:.4f} at step {best['step']}")
    print(writer_echo, flush=True)
    return results
