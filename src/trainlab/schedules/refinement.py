"""Schedule refinement (Defazio et al., "When, Why and How Much? Adaptive Learning Rate Scheduling by
Refinement"; ``facebookresearch/adaptive_scheduling``).

Linear decay is the worst-case optimal schedule; given the gradient norms logged in a pilot run (itself
run with linear decay), the closed form ``η_t ∝ w_t Σ_{s>t} w_s`` with ``w_t = ‖g_t‖₂⁻²`` (SGD) or
``‖g_t‖₁⁻¹`` (Adam-type) refines it. With constant norms it is exactly linear decay; norms that fall over
the run produce a warmup, norms that rise a faster final anneal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import median_filter
from torch.optim.lr_scheduler import LambdaLR

KINDS = ("sgd", "adam")


def smooth_grad_norms(grad_norms: Sequence[float], smoothing_fraction: float = 0.1) -> np.ndarray:
    """Median filter of width ``2⌊f·N/2⌋ + 1``, with the end reflect-padded, as the official ``visual.py``.

    Raw norms are noisy; their spikes would otherwise become spikes of the schedule.
    """
    norms = np.asarray(grad_norms, dtype=np.float64)
    width = 2 * (int(smoothing_fraction * len(norms)) // 2) + 1
    pad = 2 * width
    return median_filter(np.pad(norms, (0, pad), mode="reflect"), size=width, mode="nearest")[:-pad]


def refined_schedule(grad_norms: Sequence[float], kind: str = "sgd", smoothing_fraction: float = 0.1) -> list[float]:
    """The refined lr factors, one per step of the pilot run: max 1, last 0.

    ``grad_norms`` are the pilot run's per-step gradient norms: the ℓ2 norm for ``kind="sgd"``, the ℓ1
    norm for ``kind="adam"`` (the paper's weights for Adam-type methods).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0 <= smoothing_fraction < 1:
        raise ValueError(f"smoothing_fraction must be in [0, 1), got {smoothing_fraction!r}")
    norms = [float(g) for g in grad_norms]
    if len(norms) < 2:
        raise ValueError(f"grad_norms needs at least 2 values (one per pilot step), got {len(norms)}")
    if not all(math.isfinite(g) and g > 0 for g in norms):
        raise ValueError("grad_norms must be finite positive numbers (per-step gradient norms of a pilot run)")
    smoothed = smooth_grad_norms(norms, smoothing_fraction)
    weights = smoothed**-2.0 if kind == "sgd" else smoothed**-1.0
    later = np.concatenate([np.cumsum(weights[::-1])[::-1][1:], [0.0]])  # Σ_{s>t} w_s; 0 at the last step
    schedule = weights * later
    return (schedule / schedule.max()).tolist()


class RefinedLR(LambdaLR):
    """The refined schedule as a `LambdaLR`: step t uses ``peak_lr · refined_schedule(...)[t]``.

    Past the pilot run's length the factor stays at its last value, 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        grad_norms: Sequence[float],
        kind: str = "sgd",
        smoothing_fraction: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.factors = refined_schedule(grad_norms, kind, smoothing_fraction)
        last = len(self.factors) - 1
        super().__init__(optimizer, lambda t: self.factors[min(t, last)], last_epoch)
