"""Argument checks shared by the recipes: each error names the argument and what is allowed."""

from __future__ import annotations

import re
from typing import Any


def in_range(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, int | float) and low <= value < high):
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def betas(name: str, value: Any) -> None:
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    for i, b in enumerate(value):
        in_range(f"{name}[{i}]", b, 0.0, 1.0)


def regex_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a regular expression string or None, got {value!r}")
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{name} is not a valid regular expression ({err}): {value!r}") from None
