"""Importance scores and the cubic budget schedule shared by AdaLoRA's rank pruning and SNELL's sparsity allocation.

Sensitivity of an entry w is ``I = |w · ∂L/∂w|``; its EMA ``Ī`` and the EMA ``Ū`` of ``|I − Ī|`` (uncertainty) give
the score ``Ī · Ū`` (AdaLoRA, Zhang et al. 2023, eqs. 8-10; the official code updates ``Ū`` with the new ``Ī``).
"""

from __future__ import annotations

import torch


class SensitivityEMA:
    """EMAs of sensitivity and uncertainty for a fixed list of parameters (tensors of their shapes)."""

    def __init__(self, params: list[torch.nn.Parameter], beta1: float, beta2: float) -> None:
        self.params = params
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity = [torch.zeros_like(p) for p in params]
        self.uncertainty = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def update(self) -> None:
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not have:
            raise RuntimeError(
                "importance scores need gradients: call the callback's step() after backward() and before zero_grad()"
            )
        params = [self.params[i] for i in have]
        current = torch._foreach_mul(params, [p.grad for p in params])
        torch._foreach_abs_(current)
        sens = [self.sensitivity[i] for i in have]
        unc = [self.uncertainty[i] for i in have]
        torch._foreach_lerp_(sens, current, 1.0 - self.beta1)
        gap = torch._foreach_sub(current, sens)
        torch._foreach_abs_(gap)
        torch._foreach_lerp_(unc, gap, 1.0 - self.beta2)

    def scores(self) -> list[torch.Tensor]:
        return torch._foreach_mul(self.sensitivity, self.uncertainty)


def cubic_budget(
    step: int, total_steps: int, initial: int, target: int, init_warmup: int, final_warmup: int, interval: int
) -> tuple[int, bool]:
    """Budget at ``step`` and whether to mask now (AdaLoRA eq. 12; the official ``budget_schedule``).

    Full budget for ``step <= init_warmup``; then a cubic decrease to ``target`` at ``total_steps - final_warmup``,
    masking every ``interval`` steps; then ``target``, masking every step.
    """
    if step <= init_warmup:
        return initial, False
    if step > total_steps - final_warmup:
        return target, True
    progress = 1.0 - (step - init_warmup) / (total_steps - final_warmup - init_warmup)
    return int((initial - target) * progress**3 + target), step % interval == 0


def check_schedule(total_steps: int | None, init_warmup: int, final_warmup: int) -> int:
    if total_steps is None:
        raise ValueError("total_steps is required: the budget schedule ends at the last training step")
    if total_steps <= init_warmup + final_warmup:
        raise ValueError(
            f"total_steps={total_steps} must exceed init_warmup + final_warmup = {init_warmup + final_warmup}"
        )
    return total_steps
