"""Warmup-Stable-Decay (WSD) and its single-branch variant WSD-S (Wen et al., "Understanding
Warmup-Stable-Decay Learning Rates: A River Valley Loss Landscape Perspective").

A high constant learning rate moves fast along the "river" of the loss landscape while oscillating
across its walls; a short final decay removes the oscillation and reveals the progress. WSD-S gets a
decayed checkpoint at several budgets from ONE run: at each pit stop the decayed model is saved and
training continues from it with the learning rate jumping straight back to the peak (no re-warmup).
No official PyTorch code exists; the decay shapes and the pit-stop pattern follow Levanter
(``stanford-crfm/levanter``, ``optim/config.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

DECAY_SHAPES = ("linear", "cosine", "inv")


def _decay(shape: str, tau: float, floor: float) -> float:
    """The lr factor at decay progress ``tau`` ∈ (0, 1], going from 1 to ``floor``."""
    if shape == "linear":
        return 1 - (1 - floor) * tau
    if shape == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * tau))
    return 1 / (1 + (1 / floor - 1) * tau)  # "inv", Levanter's η/(1 + (η/η_min − 1)·τ)


def wsd_lambda(
    total_steps: int,
    warmup_steps: int | None = None,
    decay_fraction: float = 0.1,
    min_lr_ratio: float = 0.1,
    decay_shape: str = "linear",
    checkpoints: Sequence[int] | None = None,
) -> Callable[[int], float]:
    """The lr factor of step ``t`` (0-based, as `LambdaLR` passes it) under WSD or WSD-S.

    Warmup rises linearly to 1 over ``warmup_steps`` (default: 1% of ``total_steps``); each cycle
    ``[T_{k−1}, T_k)`` between pit stops ends with a decay over its last ``decay_fraction`` of steps that
    reaches ``min_lr_ratio`` exactly at its last step. ``checkpoints`` (the pit stops T_k; default:
    ``[total_steps]``, i.e. plain WSD) must increase and end at ``total_steps``. Past ``total_steps`` the
    factor stays at ``min_lr_ratio``. ``min_lr_ratio`` defaults to 0.1 as in Levanter (and the spec's
    setting); the "inv" shape needs it positive.
    """
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {decay_shape!r}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if decay_shape == "inv" and min_lr_ratio == 0:
        raise ValueError("decay_shape='inv' needs min_lr_ratio > 0 (it decays to η·min_lr_ratio hyperbolically)")
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction!r}")
    if warmup_steps is None:
        warmup_steps = total_steps // 100
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    ends = [total_steps] if checkpoints is None else [int(c) for c in checkpoints]
    if not ends or ends[-1] != total_steps or any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise ValueError(
            f"checkpoints must be strictly increasing positive steps ending at total_steps={total_steps}, "
            f"got {list(checkpoints or [])}"
        )
    # (cycle end, decay start) per cycle; each decay has at least one step.
    decays = []
    for start, end in zip([0, *ends], ends, strict=False):
        length = max(1, round(decay_fraction * (end - start)))
        decays.append((end, end - length))
    if warmup_steps > decays[0][1]:
        raise ValueError(
            f"warmup_steps={warmup_steps} runs into the first decay, which starts at step {decays[0][1]}; "
            "use fewer warmup steps, a smaller decay_fraction or a later first checkpoint"
        )

    def factor(t: int) -> float:
        if t >= total_steps:
            return min_lr_ratio
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        for end, decay_start in decays:
            if t < end:
                if t < decay_start:
                    return 1.0
                return _decay(decay_shape, (t - decay_start + 1) / (end - decay_start), min_lr_ratio)
        raise AssertionError("unreachable: t < total_steps lies in some cycle")

    return factor


class WarmupStableDecay(LambdaLR):
    """WSD as a `LambdaLR`: warmup, a long stable phase at the peak lr, and a short final decay."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int | None = None,
        decay_fraction: float = 0.1,
        min_lr_ratio: float = 0.1,
        decay_shape: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        super().__init__(
            optimizer, wsd_lambda(total_steps, warmup_steps, decay_fraction, min_lr_ratio, decay_shape), last_epoch
        )


class WarmupStableDecaySimplified(LambdaLR):
    """WSD-S: one run, a decay before every pit stop, then straight back to the peak lr.

    ``checkpoints`` defaults to three equal cycles ending at ``total_steps``. After ``checkpoints[k]``
    optimizer steps the model is the decayed checkpoint for that budget: save it there (and, if you
    resume, resume from it, not from a pre-decay state, or WSD-S turns back into WSD).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        checkpoints: Sequence[int] | None = None,
        warmup_steps: int | None = None,
        decay_fraction: float = 0.1,
        min_lr_ratio: float = 0.1,
        decay_shape: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        if checkpoints is None:
            if not isinstance(total_steps, int) or total_steps < 3:
                raise ValueError(f"total_steps must be an integer >= 3 for three cycles, got {total_steps!r}")
            checkpoints = [round(total_steps * k / 3) for k in (1, 2, 3)]
        self.checkpoints = [int(c) for c in checkpoints]
        super().__init__(
            optimizer,
            wsd_lambda(total_steps, warmup_steps, decay_fraction, min_lr_ratio, decay_shape, self.checkpoints),
            last_epoch,
        )
