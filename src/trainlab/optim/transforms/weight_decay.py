"""Weight decay, coupled (L2 added to the gradient) and decoupled (Loshchilov & Hutter)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import GradientTransform, Scratch, State, rounded


class AddWeightDecay(GradientTransform):
    """L2 regularization: ``u = g + weight_decay * p`` (torch.optim.SGD/Adam semantics)."""

    name = "add_weight_decay"
    per_parameter = True
    hyperparameters = {"weight_decay": 0.0}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        wd = group["weight_decay"]
        if wd == 0:
            return updates, state
        if isinstance(updates, Scratch):
            torch._foreach_add_(updates, params, alpha=wd)
            return updates, state
        return Scratch(torch._foreach_add(updates, params, alpha=wd)), state

    compile_refusal = ""
    n_scalars = 1

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        return [[float(group["weight_decay"])]] * n

    def static(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        return (group["weight_decay"] == 0,)

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        return u if static[0] else u + param * s[0]


class DecoupledWeightDecay(GradientTransform):
    """Decoupled decay ``p <- p * (1 - lr * weight_decay)``, applied to the parameters before the step.

    Shrinking the parameters first (as torch.optim.AdamW does) is the same update as adding
    ``weight_decay * p`` to the direction, with one pass over memory fewer.
    """

    name = "decoupled_weight_decay"
    per_parameter = True
    hyperparameters = {"weight_decay": 1e-2}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        wd = group["weight_decay"]
        if wd != 0:
            torch._foreach_mul_(params, 1 - group["lr"] * wd)
        return updates, state

    compile_refusal = ""
    n_scalars = 1

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        return [[float(1 - group["lr"] * group["weight_decay"])]] * n

    def static(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        return (group["weight_decay"] == 0,)

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        if not static[0]:
            param.copy_(rounded(param * s[0]))  # eager rounds the decayed parameter before the step adds to it
        return u


def add_weight_decay() -> AddWeightDecay:
    return AddWeightDecay()


def decoupled_weight_decay() -> DecoupledWeightDecay:
    return DecoupledWeightDecay()
