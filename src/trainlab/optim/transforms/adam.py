"""Adam's bias-corrected moment scaling (Kingma & Ba), the core of most adaptive recipes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import GradientTransform, State, new_step_counter, step_counts


class ScaleByAdam(GradientTransform):
    """``u = m_hat / (sqrt(v_hat) + eps)`` with EMAs m, v of the update and its square."""

    name = "scale_by_adam"
    hyperparameters = {"betas": (0.9, 0.999), "eps": 1e-8}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {
            "step": new_step_counter(),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        beta1, beta2 = group["betas"]
        steps = step_counts(state)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        torch._foreach_lerp_(m, updates, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, updates, updates, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in steps])
        torch._foreach_add_(denom, group["eps"])
        out = torch._foreach_div(m, denom)
        torch._foreach_div_(out, [1 - beta1**t for t in steps])
        return out, state


def scale_by_adam() -> ScaleByAdam:
    return ScaleByAdam()
