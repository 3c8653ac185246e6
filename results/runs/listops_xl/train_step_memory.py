"""Compiled temporary memory of one training step of the ListOps small models in
results/listops_xl_cpu.md: train.py's make_train_step (gradient, AdamW update),
configs/listops.py:dense,small with mean pooling (batch 32, length 128), compiled, not run.
Run: PYTHONPATH=. python3 results/runs/listops_xl/train_step_memory.py"""

import jax
import jax.numpy as jnp
from flax import nnx
from configs import listops
from lra.listops import NUM_CLASSES, VOCAB
from models import build_model
from tools.compiled import compile_fn, memory
from training import optim
from training.loop import make_train_step

ROWS = {"plain dense": {"pooling": "mean"},
        "XL dense": {"pooling": "mean", "recurrence": "xl", "segment_len": 32, "mem_len": 32}}
for name, over in ROWS.items():
    c = listops.get_config("dense,small")
    c.model.update(over)
    length, batch_size = c.data.max_len, c.data.batch_size

    def make():
        m = build_model(c, num_classes=NUM_CLASSES, vocab_size=len(VOCAB), max_len=length)
        return m, nnx.Optimizer(m, optim.optimizer(c.train), wrt=nnx.Param)
    graphdef, state = nnx.split(nnx.eval_shape(make))
    step = make_train_step(graphdef, 0, "classify")
    batch = {"inputs": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
             "mask": jax.ShapeDtypeStruct((batch_size, length), jnp.bool_),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    mem = memory(compile_fn(step, (state, batch, jax.ShapeDtypeStruct((), jnp.int32)))[0])
    print(f"{name}: temp {mem['temp_bytes'] / 2**20:.1f} MiB", flush=True)
