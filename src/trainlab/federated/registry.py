"""Federated methods by name: `federated.create("fedau", num_clients=50, dim=d)`.

Each spec names its paper, what kind of method it is and its hyperparameters: the defaults (the paper's, or its
official code's where they differ, said next to the method) are the complete list of accepted keywords, and each
has an allowed range that `create` enforces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trainlab.ranges import Range, check_hyperparameters

__all__ = ["FederatedSpec", "create", "get_spec", "register_strategy", "strategy_names"]

# What a method is: "server" (an Aggregator of one synchronous round's updates), "asynchronous" (an Aggregator
# of arrivals from clients that trained on older models), "peer-to-peer" (each honest machine aggregates what it
# receives).
KINDS = ("server", "asynchronous", "peer-to-peer")


@dataclass(frozen=True)
class FederatedSpec:
    name: str
    paper: str
    summary: str
    kind: str
    defaults: Mapping[str, Any]
    ranges: Mapping[str, Range]
    factory: Callable[..., Any]


_STRATEGIES: dict[str, FederatedSpec] = {}


def register_strategy(
    name: str, *, paper: str, summary: str, kind: str, defaults: Mapping[str, Any], ranges: Mapping[str, Range]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``factory(*, num_clients, dim, dtype, **hyperparameters)`` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}, got {kind!r}")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _STRATEGIES:
            raise ValueError(f"federated method {name!r} is already registered")
        if set(ranges) != set(defaults):
            raise ValueError(f"{name}: ranges must cover exactly the defaults' keys")
        _STRATEGIES[name] = FederatedSpec(name, paper, summary, kind, dict(defaults), dict(ranges), factory)
        return factory

    return decorator


def strategy_names(kind: str | None = None) -> list[str]:
    return sorted(n for n, s in _STRATEGIES.items() if kind is None or s.kind == kind)


def get_spec(name: str) -> FederatedSpec:
    if name not in _STRATEGIES:
        raise ValueError(f"unknown federated method {name!r}; choose one of: {', '.join(strategy_names())}")
    return _STRATEGIES[name]


def create(
    name: str, *, num_clients: int, dim: int, dtype: Any = None, compute_times: Any = None, **hyperparameters: Any
) -> Any:
    """Build method ``name`` for ``num_clients`` clients and models of ``dim`` parameters (flattened).

    Asynchronous methods also need ``compute_times``: each client's time for one local round."""
    import torch

    spec = get_spec(name)
    for arg, value in (("num_clients", num_clients), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    hp = check_hyperparameters(spec, hyperparameters)
    if (spec.kind == "asynchronous") != (compute_times is not None):
        need = "needs" if spec.kind == "asynchronous" else "takes no"
        raise ValueError(f"{name!r} ({spec.kind}) {need} compute_times")
    if compute_times is not None:
        hp["compute_times"] = compute_times
    return spec.factory(num_clients=num_clients, dim=dim, dtype=dtype, **hp)
