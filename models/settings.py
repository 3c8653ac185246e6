"""The model's settings: every field of the config's `model` group, its default and its valid
choices, declared once. configs/common.py builds `config.model` from these defaults;
build_model turns the run's group into a ModelSettings (unknown fields and bad choices are a
ValueError naming the field) and the encoders read its attributes. Numeric ranges are checked
with the rest of the config in training/validate.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

CHOICES = {
    "pooling": ("cls", "mean"),
    "pos_embedding": ("sinusoidal", "sinusoidal2d", "learned"),
    "interaction": ("nli", "concat"),
    "dtype": ("float32", "bfloat16"),
    "recurrence": ("none", "xl", "compressive"),
    "compression": ("mean", "conv"),
    "xl_positions": ("window", "none"),
}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    num_layers: int = 4              # encoder blocks
    num_heads: int = 8
    emb_dim: int = 512               # token embedding / residual width
    qkv_dim: int = 512               # total width of q, k, v over all heads
    mlp_dim: int = 1024              # block MLP hidden width and classifier hidden width
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    pooling: str = "cls"             # "cls" (learned CLS vector prepended) | "mean" (real tokens)
    pos_embedding: str = "sinusoidal"  # "sinusoidal" | "learned" | "sinusoidal2d" (grids)
    interaction: str = "nli"         # pair tasks: [u, v, u*v, u-v] -> MLP ("concat": [u, v])
    dtype: str = "float32"           # activations: "float32" | "bfloat16"
    # Memory savings (models/encoder.py): jax.checkpoint per block; Reformer's reversible
    # residual layers (no activations stored per layer); feed-forward in chunks of the length.
    remat: bool = False
    reversible: bool = False
    ffn_chunks: int = 1              # 1 = whole length at once
    # ETC global tokens: learned tokens after CLS that attend to and are seen by every token
    # (attention 'longformer': its num_global is set to the prefix; long tokens: window).
    num_global_tokens: int = 0
    # ETC's relative position labels (models/etc.py; needs num_global_tokens > 0): a learned
    # key-side embedding per label, clip(j - i, -k, k) with k = relative_max_distance for
    # long-long and global-global pairs, one label each for long-to-global and global-to-long.
    relative_labels: bool = False
    relative_max_distance: int = 12
    # Segment-level recurrence (models/recurrent.py): "none" | "xl" (Transformer-XL: segments
    # of segment_len tokens, each layer attends over [mem_len cached states; segment]; dense:
    # the paper's relative positions; another variant runs on the window [memory; segment]
    # with xl_positions; mean pooling).
    recurrence: str = "none"
    segment_len: int = 0             # xl: tokens per segment (>= 1)
    mem_len: int = 0                 # xl: cached states per layer (0 = segments independent)
    xl_positions: str = "window"     # non-dense xl: "window" sinusoids of the window's slots
                                     # added to each attention input | "none"
    # "compressive" (Compressive Transformer): XL plus a compressed memory of cmem_len slots per
    # layer; the states leaving the memory are compressed in groups of compression_rate.
    cmem_len: int = 0
    compression_rate: int = 2
    compression: str = "mean"        # "mean" pooling | "conv" (strided conv, learned)
    recon_weight: float = 1.0        # conv: weight of the attention-reconstruction loss

    def __post_init__(self):
        for field, valid in CHOICES.items():
            if getattr(self, field) not in valid:
                raise ValueError(f"model.{field} must be one of {sorted(valid)}; got "
                                 f"{getattr(self, field)!r}")

    @classmethod
    def of(cls, model: Mapping[str, Any]) -> "ModelSettings":
        """The settings of a config's `model` group; a field that is not a setting is a
        ValueError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(model) - names)
        if unknown:
            raise ValueError(f"model has no setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**model)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
