"""Lower, compile and read what a program costs: XLA's FLOPs and memory, and matmul FLOPs counted
from the jaxpr where XLA cannot (it counts a loop body once, whatever its trip count).

The one home of these numbers for the benchmarks (bench_attention, bench_speed), the cost table
and the cost tests; all are deterministic on the CPU.

    compiled, seconds = compile_fn(f, args)          # args: arrays or jax.ShapeDtypeStruct
    memory(compiled)   -> {"temp_bytes", "argument_bytes", ..., "compiled_bytes"}
    xla_flops(compiled), has_loop(compiled)
    matmul_flops(jax.make_jaxpr(f)(*args).jaxpr)
"""

from __future__ import annotations

import math
import time


def compile_fn(fn, args, *, compiler_options=None):
    """-> (jax.jit(fn) compiled at args, seconds it took to lower and compile)."""
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    compiled = (lowered.compile(compiler_options=compiler_options) if compiler_options
                else lowered.compile())
    return compiled, time.perf_counter() - t0


def xla_flops(compiled) -> float | None:
    """XLA's cost_analysis FLOPs (a while-loop body counted once), None where not reported."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (some backends do not report it)
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and cost.get("flops") is not None else None


def memory(compiled) -> dict:
    """Buffers of the compiled program (bytes); compiled_bytes = arguments + outputs +
    temporaries - donated aliases. Empty where the backend does not report them."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return {"temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "compiled_bytes": int(total),
            "xla_peak_bytes": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}


def has_loop(compiled) -> bool:
    """Whether the compiled program keeps a while loop (then XLA's FLOPs undercount)."""
    hlo = compiled.as_text() or ""
    return "while(" in hlo or " while " in hlo


def subjaxprs(eqn):
    """The jaxprs inside an equation (scan/while bodies, cond branches, custom_vjp, pjit)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            sub = getattr(item, "jaxpr", item)
            if hasattr(sub, "eqns"):
                yield sub


def matmul_flops_bounded(jaxpr) -> tuple[float, bool]:
    """(2 * multiply-adds of every dot_general, scan bodies counted `length` times and the
    costliest branch of a cond; True when a while loop of unknown trip count was counted once,
    i.e. the count is a lower bound)."""
    total, bounded = 0.0, False
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[d] for d in contract)
            continue
        counts = [matmul_flops_bounded(sub) for sub in subjaxprs(eqn)]
        bounded |= name == "while" or any(b for _, b in counts)
        if name == "cond":
            total += max((c for c, _ in counts), default=0.0)
        else:
            total += (eqn.params.get("length", 1) if name == "scan" else 1) * sum(
                c for c, _ in counts)
    return total, bounded


def matmul_flops(jaxpr) -> float:
    """matmul_flops_bounded without the bound flag."""
    return matmul_flops_bounded(jaxpr)[0]


def largest_array(jaxpr) -> int:
    """Elements of the largest value anywhere in the jaxpr (loop bodies: per iteration)."""
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            best = max(best, math.prod(getattr(var.aval, "shape", ())))
        for sub in subjaxprs(eqn):
            best = max(best, largest_array(sub))
    return best
