"""Per-variant hyperparameters for the LRA tasks, in one place.

The registry (attention/) holds each variant's generic defaults; this table holds what the
LRA setups use per task, where they differ. `for_task(variant, task)` -> overrides dict.
`shrink_for_length` scales length-bound hyperparameters down for the `tiny` configs, so a tiny
run still exercises the sparse structure instead of degenerating to dense.

"sqrt" (stride, num_clusters, block_size, compression) is ceil(sqrt(n)) at the model's max
length: the papers' O(n sqrt n) sizing, used where a task follows the paper (faithfulness
table: docs/faithfulness.md). Random state: redraw="step" (Performer's feature redraw,
Reformer's fresh hash rotations) is the papers' policy and the choice for every task here.
"""

from __future__ import annotations

# variant -> {task or "*": {hyperparameter: value}}. "*" applies to every task; a task entry
# wins over "*".
# Fixed patterns. Registry defaults follow LRA (local window 50 ~ its local
# block of 50; longformer window 256 = its sliding window of 512; bigbird blocks of 64 with 3
# window, 2 global, 3 random blocks; sparse_fixed block 128 / summary 32). On the image grids
# (32 x 32; Path-X 128 x 128) the stride is the row width, so the strided part of the Sparse
# Transformer is the pixel's column (Child et al. 2019, Sec. 4); Path-X gets the sqrt(n) sizes.
FIXED_PATTERN_HPARAMS: dict[str, dict[str, dict]] = {
    "strided": {"image": {"stride": 32}, "pathfinder": {"stride": 32},
                "pathx": {"stride": 128}},
    "sparse": {"image": {"window": 16, "stride": 32}, "pathfinder": {"window": 16, "stride": 32},
               "pathx": {"window": 64, "stride": 128}},
    "sparse_fixed": {"pathx": {"block_size": 256, "summary": 16}},
    "blockwise": {"pathx": {"chunk_size": 256}},
}

# Clustering, learned patterns, low rank, kernels, synthesizer, inducing.
# Lengths: listops 2000, text/retrieval 1000-4000, image/pathfinder 1024, pathx 16384. Bucket,
# cluster and block counts grow with the length (Reformer: ~2n / chunk buckets; Routing: sqrt(n)
# clusters, "sqrt", and half of the heads local as in the paper); low-rank sizes follow the LRA
# setups (proj_dim 256, 256 features). Redraws: the papers' policy, explicitly: Reformer fresh
# rotations every training pass, Performer features every 1000 steps (the interval of the
# reference PyTorch code; the JAX reference redraws on every call when asked to).
LEARNED_HPARAMS: dict[str, dict[str, dict]] = {
    "lsh": {"*": {"num_hashes": 2, "num_buckets": 32, "chunk_size": 64, "redraw": "step",
                  "redraw_interval": 1},
            "text": {"num_buckets": 64}, "retrieval": {"num_buckets": 64},
            "listops": {"num_buckets": 64}, "pathx": {"num_buckets": 256}},
    "routing": {"*": {"num_clusters": "sqrt", "local_head_fraction": 0.5, "local_window": 32}},
    "sinkhorn": {"*": {"block_size": 64}, "pathx": {"block_size": 128}},
    "linformer": {"*": {"proj_dim": 256}},
    "nystrom": {"*": {"num_landmarks": 64}, "pathx": {"num_landmarks": 128}},
    "compressed": {"*": {"compression": 4}, "pathx": {"compression": 16}},
    "performer": {"*": {"num_features": 256, "feature_map": "favor+", "redraw": "step",
                        "redraw_interval": 1000}},
    "synthesizer_dense": {"*": {"hidden_dim": 64}},
    # A full 16K x 16K logit matrix per head is 1 GiB; Path-X uses the factorised form.
    "synthesizer_random": {"pathx": {"factorized_rank": 64}},
    "inducing": {"*": {"num_inducing": 32}, "pathx": {"num_inducing": 64}},
}

# Gated linear recurrences and differential attention: the papers' settings,
# the same on every task. GLA: low-rank gate of rank 16, temperature 16, per-head output norm;
# its XLA chunk stays 16 (the intra-chunk pair term holds chunk x chunk x head_dim per chunk).
# DeltaNet / Gated DeltaNet: chunks of 64 (the WY solve is chunk x chunk). diff: lambda_init
# 0.8 (the paper's deep-layer value; the contract has no layer index) with the per-head norm.
RECURRENT_HPARAMS: dict[str, dict[str, dict]] = {
    "gla": {"*": {"chunk_size": 16, "gate_rank": 16, "gate_temperature": 16.0,
                  "output_norm": True}},
    "deltanet": {"*": {"chunk_size": 64, "output_norm": True}},
    "gated_deltanet": {"*": {"chunk_size": 64, "output_norm": True}},
    "diff": {"*": {"lambda_init": 0.8, "head_norm": True}},
}

# Sparse attention of 2024-2026 and per-head mixtures. Registry defaults
# suit the 1K-4K tasks (sliding_sink: window 50 like local + 4 sinks as StreamingLLM; moba:
# blocks of 64, top 3; nsa: blocks of 32, top 4, window 64). Longer inputs get the papers'
# proportions: MoBA's larger blocks (its 512 x top-3 at 8K-32K, scaled to 16K: 256), NSA's
# selection of 16 blocks of 64 and window 512 at Path-X. mixture (local,strided): on the image
# grids the strided member is the pixel's column (stride = row width), as for `sparse`.
SPARSE_2024_HPARAMS: dict[str, dict[str, dict]] = {
    "sliding_sink": {"pathx": {"window": 128}},
    "moba": {"text": {"block_size": 128}, "retrieval": {"block_size": 128},
             "pathx": {"block_size": 256}},
    "nsa": {"pathx": {"block_size": 64, "top_k": 16, "window": 512}},
    "mixture": {"image": {"member_hparams": "local.window=32,strided.stride=32"},
                "pathfinder": {"member_hparams": "local.window=32,strided.stride=32"},
                "pathx": {"member_hparams": "local.window=128,strided.stride=128"}},
}

# For tiny configs: hyperparameter -> value used when max_len is small (<= 128).
TINY_HPARAMS: dict[str, object] = {
    # chunk_size is shared with blockwise, which is exact at any chunk
    "chunk_size": 16, "num_buckets": 4, "num_clusters": 4, "proj_dim": 16,
    "num_landmarks": 8, "num_features": 32, "num_inducing": 8, "hidden_dim": 16,
    # block_size is shared with sinkhorn; 8 keeps several blocks at 64
    "window": 4, "stride": 8, "block_size": 8, "summary": 2, "num_random_blocks": 1,
    "local_window": 4,   # routing's local heads
}


def for_task(variant: str, task: str) -> dict:
    table = {**FIXED_PATTERN_HPARAMS, **LEARNED_HPARAMS, **RECURRENT_HPARAMS,
             **SPARSE_2024_HPARAMS}.get(variant, {})
    return {**table.get("*", {}), **table.get(task, {})}


def shrink_for_length(attention_config, max_len: int) -> None:
    """In place: replace length-bound hyperparameters by the TINY_HPARAMS values ("sqrt" sizes
    scale with the length by themselves and are kept)."""
    if max_len > 128:
        return
    for key, value in TINY_HPARAMS.items():
        if key in attention_config and attention_config[key] != "sqrt":
            attention_config[key] = value
