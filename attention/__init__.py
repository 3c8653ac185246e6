"""Efficient attention variants: one contract, one registry.

    import attention
    variant = attention.get("local")           # unknown name: ValueError listing valid names
    out = variant(q, k, v, kv_mask=None, causal=False, window=32)   # defaults filled, checked

Contract (see DESIGN.md):
  q: [B, Tq, H, D]; k, v: [B, Tk, H, D] (BTNH, as jax.nn.dot_product_attention).
  out: [B, Tq, H, Dv]. kv_mask: bool [B, Tk], True = real token. causal: out[i] depends on
  inputs <= i only. Learned or random arrays come from `init_state` and are passed back to
  `fn` as keyword arguments of the same names (params and buffers together).

Each family module registers its variants with `@register(...)`; every module in this package
is imported below, so a new file is registered (and tested by the registry-wide tests) by
existing. A variant declares its hyperparameters once (`hparams={"window": Int(50, min=0)}`,
attention/_hparams.py; a rule between several of them as `constraint=`): the registry fills
defaults and validates them (`Variant.resolve`), and the XLA and Pallas functions, init_state
and update_buffers take them as keywords without defaults and do not check them again.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping

from attention._hparams import Choice, Flag, Float, Hp, Int, Shape, Text, resolve

__all__ = ["Variant", "VARIANTS", "PALLAS", "get", "register", "register_pallas",
           "implementation", "resolve_impl", "names", "hparams_for", "Hp", "Int", "Float",
           "Flag", "Choice", "Shape", "Text"]


def _no_state(key, *, q_len, kv_len, num_heads, head_dim, **hparams):
    del key, q_len, kv_len, num_heads, head_dim, hparams
    return {"params": {}, "buffers": {}}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered attention variant.

    name: registry key.
    fn: fn(q, k, v, *, kv_mask=None, causal=False, **hparams_and_state) -> out, with every
      hyperparameter given (no defaults): call the variant itself to have them filled.
    hparams: {name: Hp} the declared hyperparameters (default and valid values). Every key is a
      keyword of `fn` and of `make_state`; configs override them by name.
    make_state: make_state(key, *, q_len, kv_len, num_heads, head_dim, **hparams) ->
      {"params": {name: array}, "buffers": {name: array}}. params are trained by gradient,
      buffers are not (random features, rotations, layouts, centroids). Names are keywords of fn.
      Call `init_state`, which fills and checks the hyperparameters first.
    supports_causal: False -> fn raises ValueError when called with causal=True.
    complexity: cost in sequence length n, one of the COMPLEXITIES keys (tests read it).
    doc: one line: the paper and what is computed.
    update_buffers: optional update_buffers(buffers, q, k, *, kv_mask, **hparams) -> buffers,
      called by the model layer in training mode (e.g. routing centroids' moving average).
    supports_dropout: fn accepts dropout_rate= and dropout_rng= (dropout on attention weights).
    model_supplies: hyperparameters the model sets from what it knows, {name: fact} with fact
      one of MODEL_FACTS: "grid_shape" (the task's rows x cols), "num_prefix" (tokens the model
      prepends, e.g. CLS), "layer_parity" (layer index mod 2, e.g. axial's alternating axis).
    constraint: optional constraint(hparams) -> None if they are valid together, else a message
      naming the fields: a rule between several hyperparameters (each one's range is its Hp's).
    """

    name: str
    fn: Callable[..., Any]
    hparams: Mapping[str, Hp]
    supports_causal: bool
    complexity: str
    doc: str
    make_state: Callable[..., dict] = _no_state
    update_buffers: Callable[..., dict] | None = None
    supports_dropout: bool = False
    model_supplies: Mapping[str, str] = dataclasses.field(default_factory=dict)
    constraint: Callable[[dict], str | None] | None = None

    @property
    def defaults(self) -> dict:
        return {key: hp.default for key, hp in self.hparams.items()}

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict:
        """Every hyperparameter: the defaults updated by `overrides`, checked against their
        declarations. Unknown names and invalid values are a ValueError saying what is valid."""
        hp = resolve(self.name, self.hparams, overrides)
        problem = self.constraint(hp) if self.constraint is not None else None
        if problem:
            raise ValueError(f"{self.name}: {problem}")
        return hp

    def __call__(self, q, k, v, *, impl: str = "xla", **kwargs):
        """The variant (impl "xla" | "pallas" | "auto") with the hyperparameters in kwargs filled
        from the defaults and checked; other kwargs (kv_mask, causal, state arrays, dropout)
        are passed on as they are."""
        given = {key: kwargs.pop(key) for key in list(kwargs) if key in self.hparams}
        return implementation(self.name, impl)(q, k, v, **kwargs, **self.resolve(given))

    def init_state(self, key, *, q_len: int, kv_len: int, num_heads: int, head_dim: int,
                   **overrides):
        """make_state with the hyperparameters filled from the defaults and checked."""
        return self.make_state(key, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                               head_dim=head_dim, **self.resolve(overrides))

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
    hparams: Mapping[str, Hp],
    supports_causal: bool,
    complexity: str,
    doc: str,
    init_state: Callable[..., dict] | None = None,
    update_buffers: Callable[..., dict] | None = None,
    supports_dropout: bool = False,
    model_supplies: Mapping[str, str] | None = None,
    constraint: Callable[[dict], str | None] | None = None,
):
    """Decorator: registers `fn` under `name`. Returns fn unchanged.

    hparams: {name: Hp}, each hyperparameter's default and valid values (attention/_hparams.py);
    {} for none. The other fields are Variant's."""
    declared = dict(hparams)
    for key, hp in declared.items():
        if not isinstance(hp, Hp):
            raise ValueError(f"variant {name!r}: hyperparameter {key!r} must be declared as an "
                             f"Hp (Int, Float, Flag, Choice, Shape, Text); got {hp!r}")
        hp.check(f"variant {name!r}: default of {key}", hp.default)
    problem = constraint({key: hp.default for key, hp in declared.items()}) if constraint \
        else None
    if problem:
        raise ValueError(f"variant {name!r}: the defaults break its constraint: {problem}")
    if complexity not in COMPLEXITIES:
        raise ValueError(
            f"variant {name!r}: complexity {complexity!r} is not one of {sorted(COMPLEXITIES)}"
        )
    for key, fact in (model_supplies or {}).items():
        if key not in declared or fact not in MODEL_FACTS:
            raise ValueError(f"variant {name!r}: model_supplies {key!r}: {fact!r} must name a "
                             f"declared hyperparameter and one of {MODEL_FACTS}")

    def deco(fn):
        if name in VARIANTS:
            raise ValueError(f"attention variant {name!r} is registered twice")
        VARIANTS[name] = Variant(
            name=name,
            fn=fn,
            hparams=declared,
            supports_causal=supports_causal,
            complexity=complexity,
            doc=doc,
            make_state=init_state or _no_state,
            update_buffers=update_buffers,
            supports_dropout=supports_dropout,
            model_supplies=dict(model_supplies or {}),
            constraint=constraint,
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


def resolve_impl(name: str, impl: str = "xla") -> str:
    """"xla" or "pallas": `impl` checked, "auto" decided (pallas on a GPU where a kernel
    exists, else xla)."""
    get(name)
    if impl == "auto":
        import jax

        return "pallas" if jax.default_backend() == "gpu" and name in PALLAS else "xla"
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}; got {impl!r}")
    if impl == "pallas" and name not in PALLAS:
        raise ValueError(
            f"attention variant {name!r} has no Pallas kernel; variants with one: "
            f"{', '.join(sorted(PALLAS)) or 'none'}. Use impl='xla'.")
    return impl


def implementation(name: str, impl: str = "xla") -> Callable[..., Any]:
    """The function computing variant `name` with `impl` ("xla" | "pallas" | "auto"); it takes
    every hyperparameter (hparams_for gives them), while the Variant itself fills defaults."""
    return PALLAS[name] if resolve_impl(name, impl) == "pallas" else get(name).fn


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
    """The variant's hyperparameters: defaults updated by `overrides`, each checked against its
    declaration; unknown keys and invalid values are a ValueError."""
    return get(name).resolve(overrides)


def _import_all():
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
