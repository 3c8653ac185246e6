"""Per-device compiled cost of context parallelism: one sequence split over 1, 2, 4 devices.

    python3 -m tools.bench_context_parallel            # -> results/context_parallel_cpu.{md,csv}
    python3 -m tools.bench_context_parallel --lengths 8192 --variants dense --shards 1,2

For each variant, length and number of sequence shards, the forward + backward of
attention.context_parallel.attend (batch 1, 4 heads, head_dim 64, causal and not) is compiled
for a mesh of that many host CPU devices (forced with XLA_FLAGS, set here before JAX starts);
XLA's memory_analysis temp bytes and cost_analysis FLOPs of the partitioned program are per
device. Nothing runs: compiled figures are deterministic, so fake devices are enough for memory.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.common import header_lines, machine_info, markdown_table, write_csv, write_text  # noqa: E402
from tools.compiled import compile_fn, memory, xla_flops  # noqa: E402

HEADS, HEAD_DIM = 4, 64


def cost(name: str, n: int, shards: int, causal: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import attention
    from attention import context_parallel as cp

    mesh = Mesh(np.asarray(jax.devices()[:shards]).reshape(1, shards), ("data", "seq"))
    hp = attention.hparams_for(name)
    state = attention.get(name).init_state(jax.random.key(0), q_len=n, kv_len=n,
                                           num_heads=HEADS, head_dim=HEAD_DIM, **hp)
    hp = {**hp, **state["params"], **state["buffers"]}   # e.g. the performer's projection

    def step(q, k, v, ct):
        def loss(q, k, v):
            out = cp.attend(name, q, k, v, causal=causal, mesh=mesh, **hp)
            return jnp.sum(out * ct)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    x = jax.ShapeDtypeStruct((1, n, HEADS, HEAD_DIM), jnp.float32)
    compiled, seconds = compile_fn(step, (x, x, x, x))
    return {"variant": name, "length": n, "seq_shards": shards, "causal": causal,
            "form": cp.form_of(name, hp, n // shards, causal) if shards > 1 else "one device",
            "temp_bytes": memory(compiled).get("temp_bytes"), "flops": xla_flops(compiled),
            "compile_seconds": round(seconds, 1)}


def table(rows: list[dict]) -> list[list]:
    base = {(r["variant"], r["length"], r["causal"]): r for r in rows if r["seq_shards"] == 1}
    out = []
    for r in rows:
        b = base.get((r["variant"], r["length"], r["causal"]))
        ratio = lambda k: (f" ({r[k] / b[k]:.2f}x)" if b and b[k] and r[k] is not None  # noqa: E731
                           else "")
        out.append([r["variant"], "causal" if r["causal"] else "", r["length"], r["seq_shards"],
                    r["form"], f"{r['temp_bytes'] / 2**20:,.1f}{ratio('temp_bytes')}",
                    f"{r['flops'] / 1e9:,.2f}{ratio('flops')}" if r["flops"] else "n/a"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="dense,local,linear")
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--out", default="results/context_parallel_cpu")
    a = p.parse_args(argv)
    rows = []
    for name in a.variants.split(","):
        for n in map(int, a.lengths.split(",")):
            for causal in (False, True):
                for s in map(int, a.shards.split(",")):
                    rows.append(cost(name, n, s, causal))
                    print(rows[-1], flush=True)
    header = ["variant", "mask", "length", "seq shards", "form", "temp MiB per device",
              "GFLOPs per device"]
    lines = header_lines("Context parallelism: per-device compiled cost (forward + backward)",
                         machine_info("fake host devices; compiled only, nothing run"))
    lines += ["", f"Batch 1, {HEADS} heads, head_dim {HEAD_DIM}, float32; "
              "`attention.context_parallel.attend` on a (1, seq shards) mesh. XLA memory_analysis "
              "temp bytes and cost_analysis FLOPs of the partitioned program are per device; in "
              "parentheses against one device at the same length.", ""]
    lines += markdown_table(header, table(rows), ["l", "l", "r", "r", "l", "r", "r"])
    write_text(a.out + ".md", lines)
    write_csv(a.out + ".csv", list(rows[0]), [list(r.values()) for r in rows])
    print(f"wrote {a.out}.md", flush=True)


if __name__ == "__main__":
    main()
