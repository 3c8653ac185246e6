"""Byte-level language modelling on the Python standard library's own source (task `lm`).

    python train.py --config=configs/lm.py:dense,tiny --workdir=/tmp/lm_tiny     # seconds
    python train.py --config=configs/lm.py:local,small --workdir=runs/lm_local    # learns on a CPU
    python train.py --config=configs/lm.py:performer,small,len=512 --workdir=...

Next-byte prediction (train.objective = "causal_lm", causal attention in every layer) over the
.py files of the running interpreter's standard library (lra/lm.py: files split by a hash of
their path, windows of data.max_len bytes). results.json reports test_bits_per_byte and
validation_bits_per_byte, and task_info names every file read. A variant that cannot be causal
(linformer, nystrom, inducing) is refused: the lm task must support causal attention.

No LRA setup exists for this task; the default is a mid-sized byte-level LM (4 layers, 4 heads,
emb 256, MLP 1024, context 1024, AdamW lr 1e-3, 1000 warmup steps then cosine, 20,000 steps,
dropout 0.1, mean pooling: no CLS prefix, so position t sees bytes <= t only).
`small`: 2 layers, emb 128, context 256, batch 16, 2,000 steps, validation/test capped at 256 KB
each (whole files in hash order, the last cut). `tiny`: 1 layer, context 64, 256 KB of training
text, 16 KB per evaluation split.
"""

import attention
from configs import common


def get_config(arg=None):
    variant, flags, keys = common.parse_arg(arg, known_flags=("tiny", "small"),
                                            known_keys=("len",))
    if not attention.get(variant).supports_causal:
        causal = [n for n in attention.names() if attention.get(n).supports_causal]
        raise ValueError(
            f"lm: attention variant {variant!r} cannot be causal; the lm task (next-byte "
            f"prediction) must support causal attention. Causal variants: {', '.join(causal)}")
    c = common.base_config("lm", variant)
    c.model.update(num_layers=4, num_heads=4, emb_dim=256, qkv_dim=256, mlp_dim=1024,
                   dropout_rate=0.1, attention_dropout_rate=0.1,
                   pooling="mean",            # no CLS prefix; the LM head reads every position
                   pos_embedding="sinusoidal")
    c.data.update(max_len=int(keys.get("len", 1024)),   # bytes per window (context length)
                  batch_size=32, eval_batch_size=32,
                  validation_fraction=0.05,  # share of files (by path hash) in validation
                  test_fraction=0.05,        # share of files (by path hash) in test
                  train_bytes=0,             # bytes of the train split read; 0 = all
                  eval_bytes=0)              # bytes of validation and of test read; 0 = all
    c.train.update(objective="causal_lm", steps=20000, learning_rate=1e-3, schedule="cosine",
                   warmup_steps=1000, weight_decay=0.1, grad_clip=1.0, eval_every=1000,
                   eval_examples=512, checkpoint_every=1000)

    if "tiny" in flags:
        common.shrink_tiny(c, max_len=int(keys.get("len", 64)))
        c.model.pooling = "mean"
        c.data.update(train_bytes=256 * 1024, eval_bytes=16 * 1024)
        c.train.update(learning_rate=3e-3, eval_examples=32)
    elif "small" in flags:
        c.model.update(num_layers=2, num_heads=4, emb_dim=128, qkv_dim=128, mlp_dim=256,
                       dropout_rate=0.0, attention_dropout_rate=0.0)
        c.data.update(max_len=int(keys.get("len", 256)), batch_size=16, eval_batch_size=32,
                      eval_bytes=256 * 1024)
        c.train.update(steps=2000, warmup_steps=100, learning_rate=2e-3, eval_every=500,
                       eval_examples=256, checkpoint_every=500)
        # Length-bound hyperparameters sized for a 256-byte context, so that the sparse
        # variants keep their structure (a 50-wide window or 64-blocks would be nearly dense).
        for key, value in SMALL_HPARAMS.items():
            if key in c.attention:
                c.attention[key] = value
    # model.recurrence="xl" (Transformer-XL): a window read in 4 segments, memory of one
    # segment per layer (used only when --config.model.recurrence=xl).
    c.model.segment_len = max(1, c.data.max_len // 4)
    c.model.mem_len = c.model.segment_len
    c.model.cmem_len = c.model.segment_len // 2     # recurrence="compressive": rate 2
    return c


SMALL_HPARAMS = {"window": 32, "stride": 32, "block_size": 32, "num_random_blocks": 1,
                 "chunk_size": 32, "summary": 8, "num_buckets": 8, "num_clusters": 8,
                 "num_features": 64, "compression": 4, "hidden_dim": 32}
