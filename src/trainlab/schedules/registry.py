"""Specs of the batch-size methods (adaptive batch sizes, the lr-batch rule, ghost batch norm with regime
adaptation): name, paper, what it is and its hyperparameters with the paper's defaults.

Each method's module registers its spec when imported; `trainlab.schedules` imports them all, and the
docs table reads this registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BatchMethodSpec:
    name: str
    paper: str
    summary: str
    entry: str  # the public object a user calls, e.g. "trainlab.schedules.AdaptiveBatchSize"
    defaults: Mapping[str, Any] = field(default_factory=dict)


_SPECS: dict[str, BatchMethodSpec] = {}


def register_batch_method(spec: BatchMethodSpec) -> BatchMethodSpec:
    if spec.name in _SPECS:
        raise ValueError(f"batch method {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def batch_method_names() -> list[str]:
    return sorted(_SPECS)


def get_batch_method(name: str) -> BatchMethodSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown batch method {name!r}; choose one of: {', '.join(batch_method_names())}")
    return _SPECS[name]
