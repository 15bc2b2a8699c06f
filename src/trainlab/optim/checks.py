"""Declared hyperparameter ranges: each recipe states them once, in its signature, and they are enforced
on ``create``'s keywords and on every param group (those added later with ``add_param_group`` too).

A range is a small callable object: ``check(name, value)`` raises a ValueError naming the argument and
what is allowed. Its ``repr`` is how it reads in ``help(recipe)``: ``lr: Annotated[float, at_least(0)]``.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class Check(ABC):
    """A declared range of one hyperparameter."""

    allowed: str = "valid"

    @abstractmethod
    def admits(self, value: Any) -> bool: ...

    def __call__(self, name: str, value: Any) -> None:
        if not self.admits(value):
            raise ValueError(f"{name} must be {self.allowed}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True, repr=False)
class Interval(Check):
    """A number (an int if ``integer``) between ``low`` and ``high``; each end open or closed."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def admits(self, value: Any) -> bool:
        if not _number(value) or (self.integer and not isinstance(value, int)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def allowed(self) -> str:  # type: ignore[override]
        kind = "an integer" if self.integer else "a number"
        if self.high == math.inf:
            return f"{kind} {'>' if self.low_open else '>='} {self.low}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def __repr__(self) -> str:
        return self.allowed.removeprefix("a number ").removeprefix("an integer ")


def at_least(low: float) -> Interval:
    return Interval(low)


def greater_than(low: float) -> Interval:
    return Interval(low, low_open=True)


def unit_interval(*, closed: bool = False) -> Interval:
    """[0, 1), or [0, 1] with ``closed``."""
    return Interval(0.0, 1.0, high_open=not closed)


def integer_at_least(low: int) -> Interval:
    return Interval(low, integer=True)


@dataclass(frozen=True, repr=False)
class LearningRate(Check):
    """A number >= 0 or a one-element tensor (as torch.optim accepts)."""

    allowed = "a number >= 0 or a one-element tensor"

    def admits(self, value: Any) -> bool:
        if isinstance(value, Tensor):
            return value.numel() == 1 and not value.is_complex()
        return _number(value) and value >= 0

    def __repr__(self) -> str:
        return ">= 0"


@dataclass(frozen=True, repr=False)
class Betas(Check):
    """A pair (beta1, beta2) of numbers in [0, 1)."""

    allowed = "a pair (beta1, beta2) of numbers in [0, 1)"

    def admits(self, value: Any) -> bool:
        return isinstance(value, tuple | list) and len(value) == 2 and all(unit_interval().admits(b) for b in value)

    def __call__(self, name: str, value: Any) -> None:
        if not (isinstance(value, tuple | list) and len(value) == 2):
            raise ValueError(f"{name} must be {self.allowed}, got {value!r}")
        for i, b in enumerate(value):
            unit_interval()(f"{name}[{i}]", b)

    def __repr__(self) -> str:
        return "pair in [0, 1)"


@dataclass(frozen=True, repr=False)
class OneOf(Check):
    choices: Sequence[Any]

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"one of {list(self.choices)}"

    def admits(self, value: Any) -> bool:
        return any(value is c or (type(value) is type(c) and value == c) for c in self.choices)

    def __repr__(self) -> str:
        return self.allowed


@dataclass(frozen=True, repr=False)
class Flag(Check):
    allowed = "True or False"

    def admits(self, value: Any) -> bool:
        return isinstance(value, bool)

    def __repr__(self) -> str:
        return "bool"


@dataclass(frozen=True, repr=False)
class RegexOrNone(Check):
    allowed = "a regular expression string or None"

    def admits(self, value: Any) -> bool:
        if value is None:
            return True
        if not isinstance(value, str):
            return False
        try:
            re.compile(value)
        except re.error:
            return False
        return True

    def __repr__(self) -> str:
        return "regex or None"


@dataclass(frozen=True, repr=False)
class SeedOrNone(Check):
    allowed = "an integer or None"

    def admits(self, value: Any) -> bool:
        return value is None or (isinstance(value, int) and not isinstance(value, bool))

    def __repr__(self) -> str:
        return "int or None"


@dataclass(frozen=True, repr=False)
class FloatingDtypeOrNone(Check):
    allowed = "a floating torch.dtype (e.g. torch.bfloat16) or None"

    def admits(self, value: Any) -> bool:
        return value is None or (isinstance(value, torch.dtype) and value.is_floating_point)

    def __repr__(self) -> str:
        return "floating dtype or None"


NON_NEGATIVE = at_least(0.0)
POSITIVE = greater_than(0.0)
LR = LearningRate()
BETAS = Betas()
FLAG = Flag()
REGEX_OR_NONE = RegexOrNone()
SEED = SeedOrNone()
FLOATING_DTYPE_OR_NONE = FloatingDtypeOrNone()


# Function forms, for arguments that are not declared in a signature.


def in_range(name: str, value: Any, low: float, high: float) -> None:
    """``low <= value < high``."""
    Interval(low, high, high_open=True)(name, value)


def positive_int(name: str, value: Any) -> None:
    integer_at_least(1)(name, value)


def betas(name: str, value: Any) -> None:
    BETAS(name, value)


def regex_or_none(name: str, value: Any) -> None:
    REGEX_OR_NONE(name, value)
