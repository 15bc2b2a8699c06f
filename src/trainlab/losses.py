"""StableMax and its cross-entropy (Prieto et al., "Grokking at the Edge of Numerical Stability").

Past overfitting, softmax cross-entropy in float32 reaches *Softmax Collapse*: once ``1 − p_y`` rounds to
0, the loss and the gradient of a sample are exactly 0 and learning stops. StableMax replaces ``exp``
with ``s(x) = x + 1`` (x ≥ 0), ``1/(1 − x)`` (x < 0), which grows linearly instead of exponentially, so
probabilities stay representable.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def _s(x: Tensor) -> Tensor:
    # Each branch sees only its own half-line, so neither produces inf/nan (nor a nan gradient through
    # torch.where) for inputs outside its domain.
    return torch.where(x >= 0, x.clamp(min=0) + 1, 1 / (1 - x.clamp(max=0)))


def _check_logits(logits: Tensor, dim: int) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.ndim == 0 or not -logits.ndim <= dim < logits.ndim:
        raise ValueError(f"dim must index a dimension of logits (shape {tuple(logits.shape)}), got {dim}")


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """``s(x_i) / Σ_j s(x_j)`` along ``dim``: a probability vector, monotone in each logit."""
    _check_logits(logits, dim)
    s = _s(logits)
    return s / s.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """``−log StableMax(logits)[y]`` for logits ``(..., classes)`` and integer targets ``(...)``.

    Computed in float64 (as the official ``utils.py`` does; s is only C¹ at 0 and its ratios lose
    precision in low precision) and returned in the logits' dtype.
    """
    _check_logits(logits, -1)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        raise ValueError("targets must be an integer tensor of class indices")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    s = _s(logits.to(torch.float64))
    log_p = s.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).log() - s.sum(-1).log()
    loss = -log_p
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype)
