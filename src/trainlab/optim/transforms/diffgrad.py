"""diffGrad (Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural Networks")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import State, step_counts
from trainlab.optim.transforms.adam import (
    ScaleByAdam,
    adam_ratio,
    adam_rows,
    bias_corrections,
    traced_moments_,
    traced_ratio,
    update_moments_,
)


class ScaleByDiffGrad(ScaleByAdam):
    """Adam whose first moment is damped by the friction ``ξ = sigmoid(|g_prev − g|) ∈ [0.5, 1)``.

    ``u = sqrt(1−β2^t)/(1−β1^t) · ξ⊙m / (sqrt(v) + eps)`` (diffGrad_v2.py; eps on the raw sqrt(v)).
    ``g_prev`` is a copy of the previous update: v1 kept a reference to ``p.grad``, which
    ``zero_grad(set_to_none=False)`` and in-place backward overwrite, pinning ξ at 0.5.
    At the first step ``g_prev = 0``, so ``ξ = sigmoid(|g|)``.
    """

    name = "scale_by_diffgrad"

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {**super().init(param, group), "previous_grad": torch.zeros_like(param)}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        steps = step_counts(state)
        m, v, prev = state["exp_avg"], state["exp_avg_sq"], state["previous_grad"]
        update_moments_(m, v, updates, group["betas"])
        # ξ⊙m is built in the previous-gradient buffer, which then takes a copy of this step's update.
        torch._foreach_sub_(prev, updates)
        torch._foreach_abs_(prev)
        torch._foreach_sigmoid_(prev)
        torch._foreach_mul_(prev, m)
        out = adam_ratio(prev, v, group["eps"], *bias_corrections(steps, group["betas"], raw_eps=True))
        # One copy_ per tensor: DTensor (FSDP2) has no sharding strategy for _foreach_copy_.
        for p, u in zip(prev, updates, strict=True):
            p.copy_(u)
        return out, state

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        steps = step_counts(state)
        scales = bias_corrections(steps, group["betas"], raw_eps=True)
        return adam_rows(steps, group["betas"], group["eps"], *scales)

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        m, v, prev = state["exp_avg"], state["exp_avg_sq"], state["previous_grad"]
        traced_moments_(m, v, u, s)
        friction = (prev - u).abs().sigmoid() * m
        prev.copy_(u)
        return traced_ratio(friction, v, s[3:])


def scale_by_diffgrad() -> ScaleByDiffGrad:
    return ScaleByDiffGrad()
