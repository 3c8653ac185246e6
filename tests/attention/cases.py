"""Small hyperparameters per registered variant for the registry-wide tests.

Every registered variant must have an entry (tests/attention/test_registry.py checks that
set(attention.VARIANTS) - set(CASES) is empty), chosen so that at the test lengths (16-40)
the variant's sparse structure is really exercised, not degenerate to dense.
Each helper module adds its own dict; CASES merges them.
"""

CORE_CASES = {
    "dense": {},
}

# Fixed patterns. Grid variants carry their shape
# (with a prefix token); the registry tests take the length from it.
FIXED_PATTERN_CASES: dict[str, dict] = {
    "blockwise": {"chunk_size": 8},
    "local": {"window": 3},
    "strided": {"stride": 4},
    "sparse": {"window": 2, "stride": 5},
    "sparse_fixed": {"block_size": 6, "summary": 2},
    "longformer": {"window": 3, "num_global": 2},
    "bigbird": {"block_size": 4, "num_window_blocks": 3, "num_global_blocks": 2,
                "num_random_blocks": 1},
    "axial": {"shape": (4, 6), "axis": 0, "num_prefix": 1},
    "local2d": {"shape": (5, 6), "window": 1, "num_prefix": 1},
}

# Learned patterns, low rank, kernels.
LEARNED_CASES: dict[str, dict] = {
    "lsh": {"num_hashes": 2, "num_buckets": 4, "chunk_size": 8, "shared_qk": True,
            "redraw": "step", "redraw_interval": 1},
    "routing": {"num_clusters": 4, "ema_decay": 0.9, "local_head_fraction": 0.5,
                "local_window": 3},
    "sinkhorn": {"block_size": 8, "sinkhorn_iters": 3, "temperature": 0.75},
    "linformer": {"proj_dim": 8},
    "nystrom": {"num_landmarks": 4, "pinv_iters": 6},
    "compressed": {"compression": 4},
    "linear": {"chunk_size": 8},
    "performer": {"num_features": 16, "feature_map": "favor+", "chunk_size": 8,
                  "redraw": "step", "redraw_interval": 2},
    "synthesizer_dense": {"hidden_dim": 8},
    "synthesizer_random": {"trainable": True, "factorized_rank": 4},
    "inducing": {"num_inducing": 4},
}

# Sparse attention of 2024-2026, pattern mixtures.
SPARSE_2024_CASES: dict[str, dict] = {
    "sliding_sink": {"window": 3, "num_sink": 2, "learned_sink": True},
    "moba": {"block_size": 4, "top_k": 3},
    "nsa": {"block_size": 4, "top_k": 3, "window": 3},
    "mixture": {"variants": "sliding_sink,strided",
                "member_hparams": "sliding_sink.window=3,sliding_sink.learned_sink=true,"
                                  "strided.stride=4"},
}

# Gated linear recurrences, differential attention.
RECURRENT_CASES: dict[str, dict] = {
    "gla": {"chunk_size": 8, "gate_rank": 4},
    "deltanet": {"chunk_size": 8},
    "gated_deltanet": {"chunk_size": 8},
    "diff": {"lambda_init": 0.5},
}

CASES = {**CORE_CASES, **FIXED_PATTERN_CASES, **LEARNED_CASES, **SPARSE_2024_CASES,
         **RECURRENT_CASES}
