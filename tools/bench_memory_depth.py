"""Compiled temporary memory of one training gradient vs depth: plain, remat, reversible.

    python3 -m tools.bench_memory_depth                       # -> results/memory_depth_<backend>.{md,csv}
    python3 -m tools.bench_memory_depth --depths 1,2,4 --len 256 --out /tmp/mem

For each depth and mode the tool compiles (never runs) the gradient of a classifier's loss with
respect to its parameters (dense attention, training mode, the ListOps head; dropout --dropout, 0 by default) and reads XLA's buffer assignment through tools/compiled.memory: `temp_bytes` is what the
backward pass keeps alive beyond arguments and outputs (activations saved for the backward
pass and scratch). Modes: plain (every block's activations stored), remat (model.remat: each
block's input stored, the block recomputed), reversible (Reformer's reversible layers: nothing stored
per layer), reversible+chunks (and the feed-forward in model.ffn_chunks chunks).
"""

from __future__ import annotations

import argparse
import os

from tools import common

MODES = {"plain": {}, "remat": {"remat": True}, "reversible": {"reversible": True},
         "reversible+chunks": {"reversible": True, "ffn_chunks": 8}}


def measure(depth: int, mode: str, *, length: int, batch: int, emb: int, mlp: int,
            heads: int, dropout: float = 0.0) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from configs import listops
    from models import build_model
    from tools.compiled import compile_fn, memory

    c = listops.get_config("dense")
    c.model.update(num_layers=depth, emb_dim=emb, qkv_dim=emb, mlp_dim=mlp, num_heads=heads,
                   dropout_rate=dropout, attention_dropout_rate=dropout, **MODES[mode])
    abstract = nnx.eval_shape(lambda: build_model(c, num_classes=10, vocab_size=16,
                                                  max_len=length))
    graphdef, state = nnx.split(abstract)

    def grad(state, tokens, mask, labels):
        def loss(st):
            model = nnx.merge(graphdef, st)
            logits = model(tokens, mask, train=True, rngs=nnx.Rngs(dropout=0))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return jax.grad(loss)(state)

    args = (state, jax.ShapeDtypeStruct((batch, length), jnp.int32),
            jax.ShapeDtypeStruct((batch, length), jnp.bool_),
            jax.ShapeDtypeStruct((batch,), jnp.int32))
    compiled, seconds = compile_fn(grad, args)
    mem = memory(compiled)
    return {"depth": depth, "mode": mode, "temp_bytes": mem.get("temp_bytes", 0),
            "argument_bytes": mem.get("argument_bytes", 0), "compile_s": round(seconds, 1)}


def lm_step_memory(overrides: dict, *, length: int = 256, batch: int = 16) -> dict:
    """Compiled temporary bytes of the causal-LM loss gradient of configs/lm.py:dense,small with
    `overrides` (model fields) at data.max_len = length."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import lm
    from models import build_model
    from tools.compiled import compile_fn, memory
    from training import objectives

    c = lm.get_config(f"dense,small,len={length}")
    c.model.update(overrides)
    abstract = nnx.eval_shape(lambda: build_model(c, num_classes=256, vocab_size=256,
                                                  max_len=length, head="tokens", causal=True))
    graphdef, state = nnx.split(abstract)

    def grad(state, inputs, mask):
        def loss(st):
            out = objectives.causal_lm(nnx.merge(graphdef, st), {"inputs": inputs, "mask": mask},
                                       train=True, rngs=nnx.Rngs(dropout=0))
            return out["loss_sum"].sum() / out["count"].sum()
        return jax.grad(loss)(state)

    args = (state, jax.ShapeDtypeStruct((batch, length), jnp.int32),
            jax.ShapeDtypeStruct((batch, length), jnp.bool_))
    return memory(compile_fn(grad, args)[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="1,2,4,8,16")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--len", type=int, default=512, dest="length")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--emb", type=int, default=128)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="model and attention dropout (training mode either way)")
    p.add_argument("--lm-xl", action="store_true",
                   help="instead: temp memory of an lm small training gradient, plain vs "
                        "recurrence=xl (segment 64, memory 64), printed")
    p.add_argument("--out", default=None, help="output prefix (default results/memory_depth_<backend>)")
    args = p.parse_args(argv)
    import jax

    if args.lm_xl:
        for name, over in (("plain", {}), ("xl", {"recurrence": "xl", "segment_len": 64,
                                                  "mem_len": 64})):
            mem = lm_step_memory(over)
            print(f"{name}: temp {mem['temp_bytes'] / 2**20:.2f} MiB")
        return
    backend = jax.default_backend()
    out = args.out or os.path.join(common.REPO_ROOT, "results", f"memory_depth_{backend}")
    env = common.machine_info(note="compiled, not run: the figures do not depend on the load")
    depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    rows = []
    for mode in modes:
        for depth in depths:
            r = measure(depth, mode, length=args.length, batch=args.batch, emb=args.emb,
                        mlp=args.mlp, heads=args.heads, dropout=args.dropout)
            print(r, flush=True)
            rows.append(r)
    mib = lambda b: round(b / 2**20, 2)  # noqa: E731
    by = {(r["mode"], r["depth"]): r for r in rows}
    table = []
    for depth in depths:
        table.append([depth] + [mib(by[(m, depth)]["temp_bytes"]) for m in modes]
                     + [mib(by[(modes[0], depth)]["argument_bytes"])])
    slope = []
    if len(depths) >= 2:
        d0, d1 = depths[-2], depths[-1]
        slope = [f"{d0}->{d1} layers, MiB per layer"] + [
            round((by[(m, d1)]["temp_bytes"] - by[(m, d0)]["temp_bytes"]) / 2**20 / (d1 - d0), 3)
            for m in modes] + [""]
    lines = common.header_lines("Compiled temporary memory of a training gradient vs depth", env)
    lines += [
        f"Command: `python3 -m tools.bench_memory_depth --depths {args.depths} --len "
        f"{args.length} --batch {args.batch} --emb {args.emb} --mlp {args.mlp} --heads "
        f"{args.heads} --dropout {args.dropout}`", "",
        f"Gradient of the ListOps classifier's loss (dense attention, batch {args.batch}, length "
        f"{args.length}, emb {args.emb}, MLP {args.mlp}, {args.heads} heads, dropout "
        f"{args.dropout} (model and attention), training mode), compiled and not run; XLA's temporary buffer bytes (tools/compiled."
        "memory), in MiB. `params MiB` is the argument size of the plain model (parameters and "
        "inputs). Modes: plain; remat = model.remat (each block keeps only its input; recomputed in the backward pass by a custom VJP); reversible = Reformer's "
        "reversible residual layers (custom VJP, inputs rebuilt from outputs); "
        "reversible+chunks = and the feed-forward in 8 checkpointed chunks.", ""]
    lines += common.markdown_table(["layers"] + [f"{m} MiB" for m in modes] + ["params MiB"],
                                   table + ([slope] if slope else []))
    common.write_text(out + ".md", lines)
    common.write_csv(out + ".csv", list(rows[0]), [list(r.values()) for r in rows])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
