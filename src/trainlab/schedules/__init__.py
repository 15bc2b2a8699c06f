"""Learning-rate schedules, as torch LR schedulers, and a registry so `trainlab bench --schedule` can name them.

Every scheduler multiplies the optimizer's initial (peak) lr by a factor and is stepped once per
optimizer step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, LRScheduler

from trainlab.schedules.batch_size import AdaptiveBatchSize, per_sample_gradients, proposed_batch_size
from trainlab.schedules.ghost_batch_norm import GhostBatchNorm, Regime, adapt_regime, to_ghost_batch_norm_
from trainlab.schedules.lr_batch import CurvatureFit, batch_curvature, fit_curvature, lr_for_batch_size
from trainlab.schedules.refinement import RefinedLR, refined_schedule, smooth_grad_norms
from trainlab.schedules.registry import batch_method_names, get_batch_method
from trainlab.schedules.wsd import DECAY_SHAPES, WarmupStableDecay, WarmupStableDecaySimplified, wsd_lambda


def _constant(optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda t: 1.0)


def _linear(optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    """η(1 − t/T): the worst-case optimal schedule, and the pilot schedule of refinement."""
    return LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total_steps)


def _cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    return CosineAnnealingLR(optimizer, T_max=total_steps)


def _refined(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    grad_norms: Sequence[float] | None = None,
    kind: str = "sgd",
    smoothing_fraction: float = 0.1,
) -> LRScheduler:
    if grad_norms is None:
        raise ValueError(
            "the 'refined' schedule needs grad_norms: the per-step gradient norms of a pilot run with the "
            "'linear' schedule (pass grad_norms=[...], one per step)"
        )
    if len(grad_norms) != total_steps:
        raise ValueError(f"grad_norms has {len(grad_norms)} values; the refined schedule needs {total_steps}")
    return RefinedLR(optimizer, grad_norms, kind, smoothing_fraction)


_SCHEDULERS: dict[str, Callable[..., LRScheduler]] = {
    "constant": _constant,
    "cosine": _cosine,
    "linear": _linear,
    "refined": _refined,
    "wsd": WarmupStableDecay,
    "wsd-s": WarmupStableDecaySimplified,
}


def scheduler_names() -> list[str]:
    return sorted(_SCHEDULERS)


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, **kwargs: Any) -> LRScheduler:
    """The schedule ``name`` over ``total_steps`` optimizer steps; ``kwargs`` are its options."""
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(scheduler_names())}")
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    factory = _SCHEDULERS[name]
    allowed = [p for p in inspect.signature(factory).parameters if p not in ("optimizer", "total_steps", "last_epoch")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for schedule {name!r}; allowed: {allowed or 'none'}")
    return factory(optimizer, total_steps, **kwargs)


__all__ = [
    "DECAY_SHAPES",
    "AdaptiveBatchSize",
    "CurvatureFit",
    "GhostBatchNorm",
    "RefinedLR",
    "Regime",
    "WarmupStableDecay",
    "WarmupStableDecaySimplified",
    "adapt_regime",
    "batch_curvature",
    "batch_method_names",
    "create_scheduler",
    "fit_curvature",
    "get_batch_method",
    "lr_for_batch_size",
    "per_sample_gradients",
    "proposed_batch_size",
    "refined_schedule",
    "scheduler_names",
    "smooth_grad_norms",
    "to_ghost_batch_norm_",
    "wsd_lambda",
]
