"""Declared hyperparameters: a variant states each one once, with its default and valid values.

    @register("local", hparams={"window": Int(50, min=0)}, ...)

The registry fills defaults and validates (Variant.resolve) before the XLA or Pallas function is
called, so those functions take every hyperparameter as a keyword without a default and do not
check them again. A value given on the command line as a string ("64", "true") is converted to
the declared type. A rule between several hyperparameters is the record's `constraint=`
(attention/__init__.py: register). Checks that need the inputs' shapes (a length divisible by a
block size, "sqrt" resolved with the length) stay in the function.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Hp:
    """A hyperparameter: default and what is valid. Subclasses implement `check`."""

    default: Any

    def check(self, where: str, value):
        """value, converted to the declared type; ValueError naming `where` otherwise."""
        return value

    def describe(self) -> str:
        return "any value"

    def _fail(self, where: str, value):
        raise ValueError(f"{where} must be {self.describe()}; got {value!r}")


def _as_int(value):
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
    return value


@dataclasses.dataclass(frozen=True)
class Int(Hp):
    """An integer in [min, max]; sqrt=True also allows "sqrt" (ceil(sqrt(n)), resolved by the
    function once it knows the length n)."""

    min: int = 0
    max: int | None = None
    sqrt: bool = False

    def check(self, where, value):
        if self.sqrt and value == "sqrt":
            return value
        value = _as_int(value)
        if (isinstance(value, bool) or not isinstance(value, int) or value < self.min
                or (self.max is not None and value > self.max)):
            self._fail(where, value)
        return value

    def describe(self):
        span = f">= {self.min}" if self.max is None else f"in [{self.min}, {self.max}]"
        return f"an integer {span}" + (" or 'sqrt' (ceil(sqrt(n)))" if self.sqrt else "")


@dataclasses.dataclass(frozen=True)
class Float(Hp):
    """A number in [lo, hi]."""

    lo: float = float("-inf")
    hi: float = float("inf")

    def check(self, where, value):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                self._fail(where, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not self.lo <= value <= self.hi:
            self._fail(where, value)
        return float(value) if isinstance(self.default, float) else value

    def describe(self):
        return f"a number in [{self.lo}, {self.hi}]"


@dataclasses.dataclass(frozen=True)
class Flag(Hp):
    """True or False (the strings "true"/"false" too)."""

    def check(self, where, value):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            self._fail(where, value)
        return value

    def describe(self):
        return "True or False"


@dataclasses.dataclass(frozen=True)
class Choice(Hp):
    """One of `options`."""

    options: tuple = ()

    def check(self, where, value):
        if isinstance(value, str) and all(isinstance(o, int) for o in self.options):
            value = _as_int(value)                  # "0" from the command line for (0, 1)
        if isinstance(value, bool) and not any(isinstance(o, bool) for o in self.options):
            self._fail(where, value)                # True == 1, but not an axis
        try:
            ok = value in self.options
        except TypeError:
            ok = False
        if not ok:
            self._fail(where, value)
        return value

    def describe(self):
        return f"one of {self.options}"


@dataclasses.dataclass(frozen=True)
class Shape(Hp):
    """A tuple of `ndim` integers >= 1 (a grid's rows x cols), or None where the model supplies
    it (Variant.model_supplies)."""

    ndim: int = 2

    def check(self, where, value):
        if value is None:
            return value
        try:
            sizes = tuple(_as_int(s) for s in value)
        except TypeError:
            self._fail(where, value)
        if (isinstance(value, str) or len(sizes) != self.ndim
                or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1
                       for s in sizes)):
            self._fail(where, value)
        return tuple(int(s) for s in sizes)

    def describe(self):
        return f"{self.ndim} integers >= 1"


@dataclasses.dataclass(frozen=True)
class Text(Hp):
    """A string; `valid` (optional) returns an error message for a bad one, or None."""

    valid: Callable[[str], str | None] | None = None

    def check(self, where, value):
        if not isinstance(value, str):
            self._fail(where, value)
        problem = self.valid(value) if self.valid is not None else None
        if problem:
            raise ValueError(f"{where}: {problem}; got {value!r}")
        return value

    def describe(self):
        return "a string"


def resolve(name: str, declared: dict[str, Hp], overrides) -> dict:
    """Defaults updated by `overrides`, each value checked; unknown keys are a ValueError."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(declared)
    if unknown:
        raise ValueError(
            f"attention variant {name!r} has no hyperparameter(s) {sorted(unknown)}; "
            f"valid: {sorted(declared) or 'none'}")
    return {key: hp.check(f"{name}: {key}", overrides.get(key, hp.default))
            for key, hp in declared.items()}
