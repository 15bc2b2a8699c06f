"""The learning rate as a function of the batch size, from the curvature of batch losses.

Granziol et al., "Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach to Neural
Network Training". The Hessian of a batch-B loss is the full Hessian plus a noise matrix whose variance
scales as P/B (P parameters); above the BBP threshold its top eigenvalue is the spiked-Wigner outlier

    λ₁(H_B) ≈ λ₁(H) + (P/B)σ²/λ₁(H) = a + b/B.

SGD's largest stable lr is 2/λ₁(H_B), so the lr moves as ``λ₁(H_{B₀})/λ₁(H_B)``: linear in B while
b/B dominates (B ≪ b/a, the saturation batch size) and flat beyond. For Adam the paper derives a
square-root rule, the square root of the same ratio. (The paper's constants and its stochastic-Lanczos
estimator are not reproduced: the outlier here is measured by power iteration, and a + b/B is fitted.)

Use: at a pilot checkpoint, `batch_curvature` measures λ₁(H_B) for a few batch sizes, `fit_curvature`
fits a + b/B, and `lr_for_batch_size` moves the pilot's lr to the new batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainlab.curvature import top_eigenvalues
from trainlab.schedules.registry import BatchMethodSpec, register_batch_method

RMT_PAPER = (
    "Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach to Neural Network Training "
    "(Granziol, Zohren, Roberts, 2022)"
)
RULES = ("sgd", "adam")


@dataclass(frozen=True)
class CurvatureFit:
    """``λ₁(H_B) ≈ a + b/B`` and the fit's coefficient of determination."""

    a: float
    b: float
    r2: float

    def at(self, batch_size: float) -> float:
        return self.a + self.b / batch_size

    @property
    def saturation_batch_size(self) -> float:
        """``b/a``: beyond it the noise no longer dominates and larger batches stop allowing larger lrs."""
        return self.b / self.a if self.a > 0 else math.inf


def batch_curvature(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    make_batch: Callable[[int, torch.Generator], Any],
    batch_sizes: Sequence[int],
    *,
    repeats: int = 3,
    iters: int = 30,
    seed: int = 0,
) -> dict[int, float]:
    """Mean top Hessian eigenvalue of ``loss_fn(model, batch)`` over ``repeats`` batches of each size.

    ``make_batch(size, generator)`` draws a batch; ``iters`` power iterations per batch (30 in the spec's
    check). The model's weights are not changed.
    """
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for size in batch_sizes:
        values = []
        for r in range(repeats):
            batch = make_batch(size, torch.Generator().manual_seed(1_000_003 * seed + 1009 * size + r))
            probe = torch.Generator(device=params[0].device).manual_seed(seed + r)
            top, _ = top_eigenvalues(lambda b=batch: loss_fn(model, b), params, iters=iters, generator=probe)
            values.append(float(top[0]))
        out[size] = sum(values) / len(values)
    return out


def fit_curvature(curvature: dict[int, float]) -> CurvatureFit:
    """Least-squares ``λ₁ ≈ a + b/B`` over ``{B: λ₁(H_B)}`` (at least 3 sizes), with its R²."""
    if len(curvature) < 3:
        raise ValueError(f"fit_curvature needs at least 3 batch sizes, got {len(curvature)}")
    sizes = torch.tensor(list(curvature), dtype=torch.float64)
    values = torch.tensor(list(curvature.values()), dtype=torch.float64)
    design = torch.stack([torch.ones_like(sizes), 1 / sizes], dim=1)
    coef = torch.linalg.lstsq(design, values[:, None]).solution[:, 0]
    residual = values - design @ coef
    total = ((values - values.mean()) ** 2).sum()
    r2 = 1 - float((residual**2).sum() / total) if total > 0 else 1.0
    return CurvatureFit(float(coef[0]), float(coef[1]), r2)


def lr_for_batch_size(lr: float, batch_size: int, new_batch_size: int, fit: CurvatureFit, rule: str = "sgd") -> float:
    """The pilot's ``lr`` at ``batch_size`` moved to ``new_batch_size``: times ``λ₁(H_B₀)/λ₁(H_B)`` for SGD,
    times its square root for Adam."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not (isinstance(lr, int | float) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    for name, b in (("batch_size", batch_size), ("new_batch_size", new_batch_size)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive integer, got {b!r}")
    old, new = fit.at(batch_size), fit.at(new_batch_size)
    if old <= 0 or new <= 0:
        raise ValueError(
            f"the fit a={fit.a:.3g}, b={fit.b:.3g} gives a non-positive top eigenvalue at batch size "
            f"{batch_size if old <= 0 else new_batch_size}; measure the curvature at a checkpoint past the start of "
            "training, over more batches"
        )
    ratio = old / new
    return lr * (ratio if rule == "sgd" else math.sqrt(ratio))


register_batch_method(
    BatchMethodSpec(
        name="rmt-lr-batch",
        paper=RMT_PAPER,
        summary="lr for a new batch size from the fitted batch-Hessian outlier λ₁(H_B) ≈ a + b/B: "
        "ratio (SGD) or its square root (Adam)",
        entry="trainlab.schedules.lr_for_batch_size",
        defaults={"rule": "sgd", "repeats": 3, "iters": 30},
    )
)
