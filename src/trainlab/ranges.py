"""Declared hyperparameter ranges for the pillars whose specs hold ``defaults`` and ``ranges`` (local training,
federated aggregation, distributed communication): one check, one message style."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Between:
    """An inclusive numeric range; ``integer`` asks for an int."""

    low: float
    high: float
    integer: bool = False

    def admits(self, value: Any) -> bool:
        kinds = int if self.integer else int | float
        return isinstance(value, kinds) and not isinstance(value, bool) and self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{'an integer' if self.integer else 'a number'} in [{self.low}, {self.high}]"


# A numeric range, or the tuple of allowed values of a choice.
Range = Between | tuple[Any, ...]


class RangedSpec(Protocol):
    name: str
    defaults: Mapping[str, Any]
    ranges: Mapping[str, Range]


def check_hyperparameters(spec: RangedSpec, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults overridden by ``hyperparameters``; unknown names and out-of-range values raise ValueError."""
    unknown = set(hyperparameters) - set(spec.defaults)
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "none"
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for {spec.name!r}; allowed: {allowed}")
    hp = {**spec.defaults, **hyperparameters}
    for key, value in hp.items():
        allowed = spec.ranges[key]
        if isinstance(allowed, Between):
            if not allowed.admits(value):
                raise ValueError(f"{spec.name}: {key} must be {allowed}, got {value!r}")
        elif value not in allowed:
            raise ValueError(f"{spec.name}: {key} must be one of {list(allowed)}, got {value!r}")
    return hp
