"""What a workload is, and the registry that names them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = Any


@dataclass(frozen=True)
class Workload:
    """A model, its data, loss, validation metric and target: one thing to train.

    ``make_model`` draws its initial weights from torch's global RNG (the runner seeds it), and
    ``make_batch(batch_size, generator)`` draws a training batch from the given generator only, so a run
    is a pure function of its seed. ``evaluate`` returns the validation metric of a model.
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    metric: str
    higher_is_better: bool
    target: float
    steps: int
    batch_size: int
    eval_every: int
    # Per-algorithm hyperparameters tuned for this workload; the algorithm's paper defaults fill the rest.
    hyperparameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def reached(self, metric_value: float) -> bool:
        """Whether a validation metric value meets this workload's target."""
        if self.higher_is_better:
            return metric_value >= self.target
        return metric_value <= self.target


_WORKLOADS: dict[str, Callable[[], Workload]] = {}


def register_workload(name: str) -> Callable[[Callable[[], Workload]], Callable[[], Workload]]:
    """Register a zero-argument factory that builds the workload ``name``."""

    def decorator(factory: Callable[[], Workload]) -> Callable[[], Workload]:
        if name in _WORKLOADS:
            raise ValueError(f"workload {name!r} is already registered")
        _WORKLOADS[name] = factory
        return factory

    return decorator


def workload_names() -> list[str]:
    return sorted(_WORKLOADS)


def get_workload(name: str) -> Workload:
    """Build the workload called ``name``; unknown names raise a ValueError listing the valid ones."""
    if name not in _WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of: {', '.join(workload_names())}")
    return _WORKLOADS[name]()
