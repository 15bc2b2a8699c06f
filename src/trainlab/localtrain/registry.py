"""Local-training methods by name: `localtrain.create("mono-forward", model, num_classes=10)`.

Each spec names its paper, what models it trains, and its hyperparameters: the defaults (the paper's, or its
official code's where they differ, said next to the method) are also the complete list of accepted keywords,
and each has an allowed range that `create` enforces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from trainlab.ranges import Range, check_hyperparameters


@dataclass(frozen=True)
class LocalSpec:
    name: str
    paper: str
    summary: str
    # What `model` must be: "sequential" (an nn.Sequential of layers and activations), "graph-layers"
    # (modules called as layer(x, adjacency)), "linear-layers" (any model; its nn.Linear layers are trained),
    # "backbone" (an nn.Sequential whose last layer is the classifier head).
    supports: str
    defaults: Mapping[str, Any]
    ranges: Mapping[str, Range]
    factory: Callable[..., Any]
    # True when one step fits the whole training set (the runner then passes it all at every step).
    full_batch: bool = False
    # The method's own number of steps from its hyperparameters (GBNN: one per boosting stage), if it has one.
    steps: Callable[[Mapping[str, Any]], int] | None = None


_METHODS: dict[str, LocalSpec] = {}


def register_method(
    name: str,
    *,
    paper: str,
    summary: str,
    supports: str,
    defaults: Mapping[str, Any],
    ranges: Mapping[str, Range],
    full_batch: bool = False,
    steps: Callable[[Mapping[str, Any]], int] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``factory(model, *, num_classes, **hyperparameters)`` under ``name``."""

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise ValueError(f"local-training method {name!r} is already registered")
        if set(ranges) != set(defaults):
            raise ValueError(f"{name}: ranges must cover exactly the defaults' keys")
        _METHODS[name] = LocalSpec(
            name, paper, summary, supports, dict(defaults), dict(ranges), factory, full_batch, steps
        )
        return factory

    return decorator


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_spec(name: str) -> LocalSpec:
    if name not in _METHODS:
        raise ValueError(f"unknown local-training method {name!r}; choose one of: {', '.join(method_names())}")
    return _METHODS[name]


def create(name: str, model: nn.Module, *, num_classes: int, **hyperparameters: Any) -> Any:
    """Build the local trainer ``name`` for ``model`` with the paper defaults, overridden and range-checked."""
    spec = get_spec(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return spec.factory(model, num_classes=num_classes, **check_hyperparameters(spec, hyperparameters))
