"""Compiled temporary memory of one training step of the stdlib LM small models in
results/lm_xl_cpu.md: train.py's make_train_step (gradient, AdamW update, recon_loss included),
configs/lm.py:<variant>,small (batch 16, length 256), compiled, not run.
Run: PYTHONPATH=. python3 results/runs/lm_xl/train_step_memory.py"""

import jax
import jax.numpy as jnp
from flax import nnx
from configs import lm
from models import build_model
from tools.compiled import compile_fn, memory
from training import optim
from training.loop import make_train_step

ROWS = {"plain dense": ("dense", {}),
        "XL dense": ("dense", {"recurrence": "xl", "segment_len": 64, "mem_len": 64}),
        "plain local": ("local", {}),
        "XL local": ("local", {"recurrence": "xl", "segment_len": 64, "mem_len": 64}),
        "compressive conv": ("dense", {"recurrence": "compressive", "segment_len": 64,
                                       "mem_len": 64, "cmem_len": 32, "compression_rate": 2,
                                       "compression": "conv"}),
        "compressive mean": ("dense", {"recurrence": "compressive", "segment_len": 64,
                                       "mem_len": 64, "cmem_len": 32, "compression_rate": 2,
                                       "compression": "mean"})}
for name, (variant, over) in ROWS.items():
    c = lm.get_config(f"{variant},small")
    c.model.update(over)
    def make():
        m = build_model(c, num_classes=256, vocab_size=256, max_len=256, head="tokens",
                        causal=True)
        return m, nnx.Optimizer(m, optim.optimizer(c.train), wrt=nnx.Param)
    graphdef, state = nnx.split(nnx.eval_shape(make))
    step = make_train_step(graphdef, 0, "causal_lm")
    batch = {"inputs": jax.ShapeDtypeStruct((16, 256), jnp.int32),
             "mask": jax.ShapeDtypeStruct((16, 256), jnp.bool_)}
    mem = memory(compile_fn(step, (state, batch, jax.ShapeDtypeStruct((), jnp.int32)))[0])
    print(f"{name}: temp {mem['temp_bytes'] / 2**20:.1f} MiB", flush=True)
