"""Adam's bias-corrected moment scaling (Kingma & Ba), the core of most adaptive recipes.

The moment update and the ratio ``a·n / (b·sqrt(v) + eps)`` are module functions so that the Adam
variants (SPAM, Stable-SPAM, diffGrad) reuse them with their own numerators and bias corrections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import GradientTransform, Scratch, State, new_step_counter, rounded, step_counts


def adam_rows(
    steps: Sequence[float], betas: Sequence[float], eps: float, a: Sequence[float], b: Sequence[float]
) -> list[list[float]]:
    """Host scalars of `traced_adam` per parameter: ``[1−β1, β2, 1−β2, b/a, eps/a]`` (as `adam_ratio` forms them)."""
    beta1, beta2 = betas
    return [[1 - beta1, beta2, 1 - beta2, bi / ai, eps / ai] for ai, bi in zip(a, b, strict=True)]


def traced_moments_(m: Tensor, v: Tensor, u: Tensor, s: Sequence[Tensor]) -> None:
    """`update_moments_` for one parameter, with ``s[0:3] = (1−β1, β2, 1−β2)`` as tensors."""
    m.lerp_(u, s[0])
    v.copy_(s[2] * u * u + rounded(v * s[1]))  # eager: β2·v rounded, then addcmul's (value·u)·u + that


def traced_ratio(numerator: Tensor, v: Tensor, s: Sequence[Tensor]) -> Tensor:
    """`adam_ratio` for one parameter, with ``s[0:2] = (b/a, eps/a)`` as tensors."""
    return (rounded(v.sqrt() * s[0]) + s[1]).reciprocal() * numerator


def update_moments_(m: list[Tensor], v: list[Tensor], updates: list[Tensor], betas: Sequence[float]) -> None:
    """In place: ``m ← β1·m + (1−β1)·u`` and ``v ← β2·v + (1−β2)·u²``."""
    beta1, beta2 = betas
    torch._foreach_lerp_(m, updates, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, updates, updates, 1 - beta2)


def bias_corrections(
    steps: Sequence[float], betas: Sequence[float], *, raw_eps: bool = False
) -> tuple[list[float], list[float]]:
    """The scales ``(a, b)`` of `adam_ratio` that make it Adam's ``m_hat / (sqrt(v_hat) + eps)``.

    ``a = 1/(1−β1^t)`` and ``b = 1/sqrt(1−β2^t)``. With ``raw_eps`` eps is added to the uncorrected
    sqrt(v) instead, ``sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + eps)``: the form of BERT's AdamW and of
    the official SPAM and diffGrad code (the two differ only while eps is not small against sqrt(v)).
    """
    beta1, beta2 = betas
    a = [1 / (1 - beta1**t) for t in steps]
    b = [(1 - beta2**t) ** -0.5 for t in steps]
    if raw_eps:
        return [ai / bi for ai, bi in zip(a, b, strict=True)], [1.0] * len(b)
    return a, b


def adam_ratio(
    numerators: list[Tensor],
    v: list[Tensor],
    eps: float,
    a: Sequence[float],
    b: Sequence[float],
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """``a·n / (b·sqrt(v) + eps)`` per tensor (``a``, ``b`` per-tensor scalars), as new tensors or in ``out``.

    Computed as ``n · 1/((b/a)·sqrt(v) + eps/a)`` in one buffer: on the CPU the page faults of a second
    full-size allocation per step cost more than the extra reciprocal pass. ``out`` (e.g. a `Scratch`
    list whose values are no longer needed, but not ``numerators``) saves that one allocation too.
    """
    if out is None:
        out = torch._foreach_sqrt(v)
    else:
        for o, vi in zip(out, v, strict=True):
            torch.sqrt(vi, out=o)
    torch._foreach_mul_(out, [bi / ai for ai, bi in zip(a, b, strict=True)])
    torch._foreach_add_(out, [eps / ai for ai in a])
    torch._foreach_reciprocal_(out)
    torch._foreach_mul_(out, numerators)
    return list(out)


class ScaleByAdam(GradientTransform):
    """``u = m_hat / (sqrt(v_hat) + eps)`` with EMAs m, v of the update and its square."""

    name = "scale_by_adam"
    per_parameter = True
    hyperparameters = {"betas": (0.9, 0.999), "eps": 1e-8}
    raw_eps = False  # True: eps on the uncorrected sqrt(v) (see `bias_corrections`)

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {
            "step": new_step_counter(),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        steps = step_counts(state)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        update_moments_(m, v, updates, group["betas"])
        out = updates if isinstance(updates, Scratch) else None  # spent once in the moments: reuse them
        scales = bias_corrections(steps, group["betas"], raw_eps=self.raw_eps)
        return Scratch(adam_ratio(m, v, group["eps"], *scales, out=out)), state

    compile_refusal = ""
    n_scalars = 5

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        steps = step_counts(state)
        scales = bias_corrections(steps, group["betas"], raw_eps=self.raw_eps)
        return adam_rows(steps, group["betas"], group["eps"], *scales)

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        traced_moments_(m, v, u, s)
        return traced_ratio(m, v, s[3:])


def scale_by_adam() -> ScaleByAdam:
    return ScaleByAdam()
