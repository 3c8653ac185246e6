"""Shared test setup: CPU, deterministic, fast compiles."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile fast: the tests' programs are small, so XLA's compile time dominates. These are
# tests/attention/compile_options.FAST_COMPILE's options for every program of the test processes
# and of the processes they start (which inherit the environment; a test that sets its own
# XLA_FLAGS appends to these). See that file for what they keep; the tables in results/ come from
# tools/ with the default options.
FAST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compile():
    """Small shapes: compile time dominates, so skip most XLA optimisations in the module that
    asks (`pytestmark = pytest.mark.usefixtures("fast_compile")`)."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
