"""Shared test setup: CPU, deterministic, fast compiles."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
