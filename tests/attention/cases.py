"""Small hyperparameters per registered variant for the registry-wide tests.

Every registered variant must have an entry (tests/attention/test_registry.py checks that
set(attention.VARIANTS) - set(CASES) is empty), chosen so that at the test lengths (16-40)
the variant's sparse structure is really exercised, not degenerate to dense.
Each helper module adds its own dict; CASES merges them.
"""

CORE_CASES = {
    "dense": {},
}

# attention part 1 (fixed patterns) adds its entries here.
FIXED_PATTERN_CASES: dict[str, dict] = {
}

# attention part 2 (learned / low-rank / kernels) adds its entries here.
LEARNED_CASES: dict[str, dict] = {
}

CASES = {**CORE_CASES, **FIXED_PATTERN_CASES, **LEARNED_CASES}
