"""Efficient attention variants: one contract, one registry.

    import attention
    variant = attention.get("local")           # unknown name: ValueError listing valid names
    out = variant(q, k, v, kv_mask=None, causal=False, window=32)   # same as variant.fn(...)

Contract (see DESIGN.md):
  q: [B, Tq, H, D]; k, v: [B, Tk, H, D] (BTNH, as jax.nn.dot_product_attention).
  out: [B, Tq, H, Dv]. kv_mask: bool [B, Tk], True = real token. causal: out[i] depends on
  inputs <= i only. Learned or random arrays come from `init_state` and are passed back to
  `fn` as keyword arguments of the same names (params and buffers together).

Each family module registers its variants with `@register(...)`; every module in this package
is imported below, so a new file is registered (and tested by the registry-wide tests) by
existing.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping

__all__ = ["Variant", "VARIANTS", "PALLAS", "get", "register", "register_pallas",
           "implementation", "names", "hparams_for"]


def _no_state(key, *, q_len, kv_len, num_heads, head_dim, **hparams):
    del key, q_len, kv_len, num_heads, head_dim, hparams
    return {"params": {}, "buffers": {}}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered attention variant.

    name: registry key.
    fn: fn(q, k, v, *, kv_mask=None, causal=False, **hparams_and_state) -> out.
    defaults: the variant's hyperparameters and their default values. Every key is a keyword of
      `fn` and of `init_state`; configs override them by name.
    init_state: init_state(key, *, q_len, kv_len, num_heads, head_dim, **hparams) ->
      {"params": {name: array}, "buffers": {name: array}}. params are trained by gradient,
      buffers are not (random features, rotations, layouts, centroids). Names are keywords of fn.
    supports_causal: False -> fn raises ValueError when called with causal=True.
    complexity: cost in sequence length n, one of the COMPLEXITIES keys (tests read it).
    doc: one line: the paper and what is computed.
    update_buffers: optional update_buffers(buffers, q, k, *, kv_mask, **hparams) -> buffers,
      called by the model layer in training mode (e.g. routing centroids' moving average).
    supports_dropout: fn accepts dropout_rate= and dropout_rng= (dropout on attention weights).
    model_supplies: hyperparameters the model sets from what it knows, {name: fact} with fact
      one of MODEL_FACTS: "grid_shape" (the task's rows x cols), "num_prefix" (tokens the model
      prepends, e.g. CLS), "layer_parity" (layer index mod 2, e.g. axial's alternating axis).
    """

    name: str
    fn: Callable[..., Any]
    defaults: Mapping[str, Any]
    supports_causal: bool
    complexity: str
    doc: str
    init_state: Callable[..., dict] = _no_state
    update_buffers: Callable[..., dict] | None = None
    supports_dropout: bool = False
    model_supplies: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __call__(self, q, k, v, *, impl: str = "xla", **kwargs):
        """fn(q, k, v, **kwargs) with impl="xla", or the Pallas kernel with impl="pallas"."""
        return implementation(self.name, impl)(q, k, v, **kwargs)

    @property
    def has_pallas(self) -> bool:
        return self.name in PALLAS


# How compiled cost grows with the sequence length n (other hyperparameters fixed). The
# registry-wide cost test asserts the growth of FLOPs from n to 2n against these exponents.
COMPLEXITIES = {
    "O(n^2)": 2.0,        # dense, quadratic by design (dense, synthesizer, blockwise FLOPs)
    "O(n^2/s)": 2.0,      # strided: n^2 / stride
    "O(n log n)": 1.0,    # lsh (sort), growth ratio a little above 2 from n to 2n
    "O(n)": 1.0,          # local, sparse, longformer, bigbird, low rank, kernels
    "O(n sqrt n)": 1.5,   # axial on a square grid
}

# What a model knows and may supply to a variant (Variant.model_supplies).
MODEL_FACTS = ("grid_shape", "num_prefix", "layer_parity")

VARIANTS: dict[str, Variant] = {}
# name -> Pallas implementation with the same signature as the variant's fn (attention/pallas/).
PALLAS: dict[str, Callable[..., Any]] = {}
IMPLS = ("xla", "pallas", "auto")  # auto: pallas on a GPU where a kernel exists, else xla


def register(
    name: str,
    *,
    defaults: Mapping[str, Any],
    supports_causal: bool,
    complexity: str,
    doc: str,
    init_state: Callable[..., dict] | None = None,
    update_buffers: Callable[..., dict] | None = None,
    supports_dropout: bool = False,
    model_supplies: Mapping[str, str] | None = None,
):
    """Decorator: registers `fn` under `name`. Returns fn unchanged."""
    if complexity not in COMPLEXITIES:
        raise ValueError(
            f"variant {name!r}: complexity {complexity!r} is not one of {sorted(COMPLEXITIES)}"
        )
    for key, fact in (model_supplies or {}).items():
        if key not in defaults or fact not in MODEL_FACTS:
            raise ValueError(f"variant {name!r}: model_supplies {key!r}: {fact!r} must name a "
                             f"hyperparameter in defaults and one of {MODEL_FACTS}")

    def deco(fn):
        if name in VARIANTS:
            raise ValueError(f"attention variant {name!r} is registered twice")
        VARIANTS[name] = Variant(
            name=name,
            fn=fn,
            defaults=dict(defaults),
            supports_causal=supports_causal,
            complexity=complexity,
            doc=doc,
            init_state=init_state or _no_state,
            update_buffers=update_buffers,
            supports_dropout=supports_dropout,
            model_supplies=dict(model_supplies or {}),
        )
        return fn

    return deco


def register_pallas(name: str):
    """Decorator: registers a Pallas implementation of the (already registered) variant."""

    def deco(fn):
        if name in PALLAS:
            raise ValueError(f"Pallas implementation of {name!r} is registered twice")
        PALLAS[name] = fn
        return fn

    return deco


def implementation(name: str, impl: str = "xla") -> Callable[..., Any]:
    """The function computing variant `name` with `impl` ("xla" | "pallas" | "auto")."""
    variant = get(name)
    if impl == "auto":
        import jax

        impl = "pallas" if jax.default_backend() == "gpu" and name in PALLAS else "xla"
    if impl == "xla":
        return variant.fn
    if impl == "pallas":
        if name not in PALLAS:
            raise ValueError(
                f"attention variant {name!r} has no Pallas kernel; variants with one: "
                f"{', '.join(sorted(PALLAS)) or 'none'}. Use impl='xla'.")
        return PALLAS[name]
    raise ValueError(f"attention impl must be one of {IMPLS}; got {impl!r}")


def names() -> list[str]:
    return sorted(VARIANTS)


def get(name: str) -> Variant:
    """The registered variant `name`; ValueError listing the valid names otherwise."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unrecognized attention variant: {name!r}. Valid names: {', '.join(names())}"
        ) from None


def hparams_for(name: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """The variant's defaults updated by `overrides`; unknown keys are a ValueError."""
    variant = get(name)
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(variant.defaults)
    if unknown:
        raise ValueError(
            f"attention variant {name!r} has no hyperparameter(s) {sorted(unknown)}; "
            f"valid: {sorted(variant.defaults) or 'none'}"
        )
    return {**variant.defaults, **overrides}


def _import_all():
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
