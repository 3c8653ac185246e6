"""XLA options for the attention tests' many small programs: compile fast, same results.

Per jit (`jax.jit(f, compiler_options=FAST_COMPILE)` or `.compile(compiler_options=...)`), so no
global state changes. Measured on this CPU (jax 0.10.2): about 3x less compile time than
`jax_disable_most_optimizations` alone and 5-8x less than the defaults; outputs agree to float
rounding, and compiled FLOPs / temp bytes grow by the same ratios with n as with the defaults.
"""

FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,   # the elemental IR emitter compiles much faster
}
