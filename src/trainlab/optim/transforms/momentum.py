"""Heavy-ball and Nesterov momentum with torch.optim.SGD's semantics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import GradientTransform, Scratch, State, rounded


class TraceMomentum(GradientTransform):
    """``b = momentum * b + (1 - dampening) * u`` (b starts at the first u); Nesterov uses ``u + momentum * b``."""

    name = "trace_momentum"
    per_parameter = True
    hyperparameters = {"momentum": 0.9, "dampening": 0.0, "nesterov": False}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(param), "started": torch.zeros((), dtype=torch.bool)}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        if nesterov and (mu <= 0 or damp != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        if mu == 0:
            return updates, state
        bufs, started = state["momentum_buffer"], state["started"]
        running = [i for i, s in enumerate(started) if s]
        for i in set(range(len(bufs))) - set(running):  # a buffer starts as a copy of the first update
            bufs[i].copy_(updates[i])
            started[i].fill_(True)
        if running:
            sub_bufs = [bufs[i] for i in running]
            torch._foreach_mul_(sub_bufs, mu)
            torch._foreach_add_(sub_bufs, [updates[i] for i in running], alpha=1 - damp)
        if nesterov:
            if isinstance(updates, Scratch):  # e.g. the L2-decayed copies: ours to overwrite
                torch._foreach_add_(updates, bufs, alpha=mu)
                return updates, state
            return Scratch(torch._foreach_add(updates, bufs, alpha=mu)), state
        return list(bufs), state

    compile_refusal = ""
    n_scalars = 3

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        if nesterov and (mu <= 0 or damp != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        if mu == 0:
            return [[0.0, 0.0, 0.0]] * n
        started = torch.stack(state["started"]).tolist()  # host flags: one conversion, no sync
        for flag in state["started"]:
            flag.fill_(True)
        return [[mu, 1 - damp, float(s)] for s in started]

    def static(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        return (group["momentum"] == 0, bool(group["nesterov"]))

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        off, nesterov = static
        if off:
            return u
        buf = state["momentum_buffer"]
        # Eager rounds μ·b, then adds (1 − dampening)·u in one FMA (add_ with alpha). A buffer starts as u.
        buf.copy_(torch.where(s[2] > 0, u * s[1] + rounded(buf * s[0]), u))
        return u + buf * s[0] if nesterov else buf


def trace_momentum() -> TraceMomentum:
    return TraceMomentum()
