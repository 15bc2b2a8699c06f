"""PTQTP ("Post-Training Quantization to Trit-Planes"): ``W ~ diag(a1) T1 + diag(a2) T2`` with ternary planes
``T1, T2`` in {-1, 0, 1} and one pair of scales per row (or per row and group of ``group_size`` columns).

No official code was found; this follows the reconstruction in the spec pack (constants unconfirmed):

* init: ``T1`` = TWN ternary of ``W`` (threshold ``0.7 mean|w|``), ``a1`` = mean ``|w|`` where ``T1 != 0``;
  ``T2, a2`` the same on the residual ``W - a1 T1``;
* repeat up to ``max_iter`` times: T-step, each weight takes the best of the 9 pairs ``(t1, t2)`` for the
  current scales (exact for fixed scales); then scale step, per row/group the 2x2 ridge normal equations
  ``(T^T T + ridge I) a = T^T w`` with ``T = [T1 T2]``. Stop when the objective
  ``||W - W_hat||^2 + ridge ||a||^2`` falls by less than ``tol`` (relative). Both steps minimize that
  objective, so it never increases; the returned scales solve the normal equations for the returned planes.

Storage is 2 trits per weight (log2(9) = 3.17 bits raw; 3.2 bits packed 5 trits a byte by
:mod:`trainlab.compress.bits`) plus two scales per row/group: compare with 3-bit grids, not 2-bit ones, when claiming
efficiency. Scales are rounded to the nearest float16 at the end (``scale_dtype``), so the in-memory result
is exactly what is stored; ``scale_dtype=None`` keeps them exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainlab.compress.bits import TRITS_PER_BYTE, pack_trits, unpack_trits
from trainlab.compress.formats import default_dtype, float16_part, register_format
from trainlab.compress.quant.grids import SCALE_DTYPES, check_group_size, check_weight, expand_groups, num_groups
from trainlab.compress.registry import Hyperparameter, register_compressor

TWN_THRESHOLD = 0.7  # Ternary Weight Networks: threshold 0.7 * mean|w|
MAX_ITER, TOL, RIDGE = 50, 1e-6, 1e-6  # spec pack's reconstruction (unconfirmed)

# the 9 candidate pairs (t1, t2); (0, 0) first so exact ties (e.g. padding zeros) pick it
_PAIRS = torch.tensor([(0, 0)] + [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)])


@register_format("trits")
@dataclass(frozen=True)
class TritPlanes:
    """``t1``, ``t2``: int8 ``(rows, cols)`` in {-1, 0, 1}; ``alpha1``, ``alpha2``: ``(rows, groups)``;
    ``objective``: the objective after initialization and after each iteration (before any float16 rounding
    of the scales). Stored as ``t1``, ``t2`` (5 trits a byte) and float16 ``alpha1``, ``alpha2``; a loaded
    object has an empty ``objective``."""

    t1: torch.Tensor
    t2: torch.Tensor
    alpha1: torch.Tensor
    alpha2: torch.Tensor
    group_size: int | None
    objective: list[float]

    @property
    def iterations(self) -> int:
        return len(self.objective) - 1

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``a1 T1 + a2 T2``; ``dtype`` defaults to the scales' (float32 when scales are float16)."""
        dtype = default_dtype(self.alpha1.dtype, dtype)
        cols = self.t1.shape[1]
        a1 = expand_groups(self.alpha1.to(dtype), cols, self.group_size)
        a2 = expand_groups(self.alpha2.to(dtype), cols, self.group_size)
        return a1 * self.t1.to(dtype) + a2 * self.t2.to(dtype)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}t1": pack_trits(self.t1),
            f"{prefix}t2": pack_trits(self.t2),
            f"{prefix}alpha1": float16_part("alpha1", self.alpha1),
            f"{prefix}alpha2": float16_part("alpha2", self.alpha2),
        }

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.t1.shape), "group_size": self.group_size}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]) -> TritPlanes:
        rows, cols = metadata["shape"]
        t1, t2 = (unpack_trits(tensors[f"{prefix}{t}"], rows * cols).reshape(rows, cols) for t in ("t1", "t2"))
        alpha1, alpha2 = tensors[f"{prefix}alpha1"], tensors[f"{prefix}alpha2"]
        return cls(t1, t2, alpha1, alpha2, metadata["group_size"], [])

    def nbytes(self) -> int:
        """Two trit-planes at 5 trits a byte and two float16 scales per row/group."""
        return 2 * math.ceil(self.t1.numel() / TRITS_PER_BYTE) + 2 * (self.alpha1.numel() + self.alpha2.numel())


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, groups, size)`` view of ``w`` zero-padded to whole groups, and the mask of real entries."""
    rows, cols = w.shape
    size = cols if group_size is None else group_size
    groups = num_groups(cols, group_size)
    pad = groups * size - cols
    valid = torch.ones(rows, cols, dtype=torch.bool)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    return w.reshape(rows, groups, size), valid.reshape(rows, groups, size)


def _ternary(w: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN: ``t = sign(w) [|w| > 0.7 mean|w|]`` and ``alpha`` = mean ``|w|`` over the kept entries, per group."""
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    delta = TWN_THRESHOLD * w.abs().sum(-1, keepdim=True) / count
    t = torch.sign(w) * ((w.abs() > delta) & valid)
    kept = t.abs().sum(-1)
    alpha = torch.where(kept > 0, (w.abs() * t.abs()).sum(-1) / kept.clamp(min=1), torch.zeros_like(kept))
    return t, alpha


def _solve_scales(w: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, ridge: float) -> torch.Tensor:
    """Per row/group, ``(T^T T + ridge I)^-1 T^T w``; returns ``(rows, groups, 2)``."""
    a11, a22, a12 = (t1 * t1).sum(-1), (t2 * t2).sum(-1), (t1 * t2).sum(-1)
    gram = torch.stack([torch.stack([a11, a12], -1), torch.stack([a12, a22], -1)], -2)
    gram = gram + ridge * torch.eye(2, dtype=w.dtype)
    rhs = torch.stack([(t1 * w).sum(-1), (t2 * w).sum(-1)], -1)
    if ridge == 0:  # singular when a plane is empty or the planes are equal: least-norm solution
        return (torch.linalg.pinv(gram) @ rhs.unsqueeze(-1)).squeeze(-1)
    return torch.linalg.solve(gram, rhs)


def _objective(w: torch.Tensor, t1, t2, alpha: torch.Tensor, ridge: float) -> float:
    approx = alpha[..., :1] * t1 + alpha[..., 1:] * t2
    return float((w - approx).square().sum() + ridge * alpha.square().sum())


def quantize_ptqtp(
    weight: torch.Tensor,
    *,
    group_size: int | None = None,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    ridge: float = RIDGE,
    scale_dtype: torch.dtype | None = torch.float16,
) -> TritPlanes:
    """Fit two ternary planes and their scales to ``weight`` (``(rows, cols)``) by alternating minimization;
    computed in the weight's dtype (float32 at least)."""
    check_weight(weight)
    check_group_size(group_size)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(tol, int | float) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not isinstance(ridge, int | float) or ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be torch.float16 or None, got {scale_dtype!r}")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    rows, cols = weight.shape
    w, valid = _grouped(weight.detach().to(dtype), group_size)
    t1, a1 = _ternary(w, valid)
    t2, a2 = _ternary(w - a1.unsqueeze(-1) * t1, valid)
    alpha = torch.stack([a1, a2], -1)
    history = [_objective(w, t1, t2, alpha, ridge)]
    pairs = _PAIRS.to(dtype)
    for _ in range(max_iter):
        levels = alpha @ pairs.T  # (rows, groups, 9): the value of each candidate pair
        best = (w.unsqueeze(-1) - levels.unsqueeze(-2)).abs().argmin(-1)
        best = torch.where(valid, best, torch.zeros_like(best))  # padding keeps (0, 0)
        t1, t2 = pairs[best, 0], pairs[best, 1]
        alpha = _solve_scales(w, t1, t2, ridge)
        history.append(_objective(w, t1, t2, alpha, ridge))
        if history[-2] - history[-1] <= tol * max(history[-2], torch.finfo(dtype).tiny):
            break

    def plane(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(rows, -1)[:, :cols].to(torch.int8)

    if scale_dtype is not None:
        if not torch.isfinite(alpha.to(scale_dtype)).all():
            raise ValueError(f"a scale exceeds the range of {scale_dtype}; use scale_dtype=None")
        alpha = alpha.to(scale_dtype).to(dtype)
    return TritPlanes(plane(t1), plane(t2), alpha[..., 0], alpha[..., 1], group_size, history)


@register_compressor(
    "ptqtp",
    paper="PTQTP: Post-Training Quantization to Trit-Planes for Large Language Models",
    summary="two ternary planes with per-row (or per-group) scales, 3.2 bits/weight packed",
    kind="quantizer",
    level="bits",
    bits=(3,),
    grouped=True,
    hyperparameters={"max_iter": Hyperparameter(MAX_ITER, low=1, high=10_000)},
)
def ptqtp(weight: torch.Tensor, *, bits: int, group_size: int | None = None, max_iter: int = MAX_ITER) -> TritPlanes:
    """``bits`` is 3: the packed size of two trit-planes (3.2 bits per weight)."""
    return quantize_ptqtp(weight, group_size=group_size, max_iter=int(max_iter))
