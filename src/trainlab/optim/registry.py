"""Optimizers by name: `create("lion", model.parameters(), lr=1e-4)` and `trainlab bench --algorithms`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    paper: str
    summary: str
    defaults: Mapping[str, Any]
    factory: Callable[..., torch.optim.Optimizer]


_OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(
    name: str, *, paper: str, summary: str, defaults: Mapping[str, Any]
) -> Callable[[Callable[..., torch.optim.Optimizer]], Callable[..., torch.optim.Optimizer]]:
    """Register ``factory(params, **hyperparameters)`` under ``name``.

    ``defaults`` are the paper's hyperparameters and also the complete list of accepted keywords.
    """

    def decorator(factory: Callable[..., torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
        if name in _OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        _OPTIMIZERS[name] = OptimizerSpec(name, paper, summary, dict(defaults), factory)
        return factory

    return decorator


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def get_spec(name: str) -> OptimizerSpec:
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(optimizer_names())}")
    return _OPTIMIZERS[name]


def create(name: str, params: Any, **hyperparameters: Any) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``params`` with the paper defaults, overridden."""
    spec = get_spec(name)
    unknown = set(hyperparameters) - set(spec.defaults)
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for {name!r}; allowed: {allowed}")
    return spec.factory(params, **{**spec.defaults, **hyperparameters})
