"""Lion and Lion-𝒦 (Chen et al., "Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts").

With decoupled weight decay λ, Lion-𝒦 minimizes f subject to the constraint set of 𝒦's dual norm:
𝒦 = ℓ1 (∇𝒦 = sign, Lion) keeps ``‖x‖∞ ≤ 1/λ``; 𝒦 = ℓ2 (∇𝒦 = c/‖c‖) keeps ``‖x‖₂ ≤ 1/λ``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import GradientTransform, Scratch, State, hoisted

LION_K = ("l1", "l2")


class ScaleByLion(GradientTransform):
    """``c = β1·m + (1−β1)·g``; direction ``∇𝒦(c)``; then ``m ← β2·m + (1−β2)·g``.

    ``k="l1"`` gives sign(c) (Lion); ``k="l2"`` gives c/‖c‖ per tensor (normalized momentum).
    """

    name = "scale_by_lion"
    per_parameter = True
    hyperparameters = {"betas": (0.9, 0.99)}

    def __init__(self, k: str = "l1") -> None:
        if k not in LION_K:
            raise ValueError(f"k must be one of {LION_K} (the norm 𝒦 of Lion-𝒦), got {k!r}")
        self.k = k

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        beta1, beta2 = group["betas"]
        m = state["exp_avg"]
        c = torch._foreach_lerp(m, updates, 1 - beta1)
        if self.k == "l1":
            torch._foreach_sign_(c)
        else:  # a zero c stays zero: its norm is clamped away from 0
            torch._foreach_div_(c, torch._foreach_clamp_min(torch._foreach_norm(c), torch.finfo(c[0].dtype).tiny))
        torch._foreach_lerp_(m, updates, 1 - beta2)
        return Scratch(c), state

    compile_refusal = ""
    n_scalars = 2

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        beta1, beta2 = group["betas"]
        return [[1 - beta1, 1 - beta2]] * n

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        m = state["exp_avg"]
        c = m.lerp(u, s[0])
        if self.k == "l1":
            c = c.sign()
        else:
            c = c / hoisted(torch.linalg.vector_norm(c).clamp_min(torch.finfo(c.dtype).tiny))
        m.lerp_(u, s[1])
        return c


def scale_by_lion(k: str = "l1") -> ScaleByLion:
    return ScaleByLion(k)
