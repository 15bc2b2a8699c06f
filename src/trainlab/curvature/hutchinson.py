"""Hutchinson estimators: ``E[z ⊙ Hz] = diag(H)`` and ``E[zᵀHz] = tr(H)`` for Rademacher probes z.

Both build the gradient graph once and reuse it for every probe (one double-backward per sample).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from trainlab.curvature.hvp import LossFn, gradients_with_graph, hvp_from_gradients, rademacher_like


def _check_samples(samples: int) -> None:
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")


def _probe_products(
    loss_fn: LossFn, params: Sequence[Tensor], samples: int, generator: torch.Generator | None
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Yield ``(z, Hz)`` for ``samples`` probes, differentiating one gradient graph again each time."""
    _check_samples(samples)
    params = list(params)
    grads = gradients_with_graph(loss_fn, params)
    for i in range(samples):
        z = rademacher_like(params, generator)
        hz = hvp_from_gradients(grads, params, z, retain_graph=i < samples - 1)
        yield z, [h.detach() for h in hz]


def hutchinson_diagonal(
    loss_fn: LossFn, params: Sequence[Tensor], samples: int = 100, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Unbiased estimate of the Hessian diagonal, one tensor per parameter: mean of ``z ⊙ Hz``."""
    params = list(params)
    total = [torch.zeros_like(p, dtype=p.dtype) for p in params]
    for z, hz in _probe_products(loss_fn, params, samples, generator):
        torch._foreach_addcmul_(total, z, hz)
    return torch._foreach_div(total, float(samples))


def hutchinson_trace(
    loss_fn: LossFn, params: Sequence[Tensor], samples: int = 100, generator: torch.Generator | None = None
) -> Tensor:
    """Unbiased estimate of the Hessian trace (a 0-d tensor): mean of ``zᵀHz``."""
    params = list(params)
    total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    for z, hz in _probe_products(loss_fn, params, samples, generator):
        total = total + sum(torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(z, hz, strict=True))
    return total / samples
