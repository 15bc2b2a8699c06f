"""Top Hessian eigenvalues by power iteration with deflation (as PyHessian does), matrix-free."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainlab.curvature.hvp import LossFn, gradients_with_graph, hvp_from_gradients


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True))


def _normalize(v: list[Tensor]) -> list[Tensor]:
    return torch._foreach_div(v, torch.sqrt(_dot(v, v)))


def top_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = 1,
    iters: int = 200,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[list[Tensor]]]:
    """The ``k`` Hessian eigenvalues of largest magnitude (descending) and their eigenvectors.

    Each eigenpair is found by power iteration on ``H`` restricted to the orthogonal complement of the
    ones already found (the iterate is re-projected every step, which keeps deflation stable). An
    iteration stops when the Rayleigh quotient changes by less than ``tol`` relative, or after ``iters``.
    Convergence is geometric in |λ_{i+1}/λ_i|: close eigenvalues need more iterations.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    params = list(params)
    grads = gradients_with_graph(loss_fn, params)
    values: list[Tensor] = []
    vectors: list[list[Tensor]] = []

    def deflate(v: list[Tensor]) -> list[Tensor]:
        for u in vectors:
            v = torch._foreach_sub(v, torch._foreach_mul(u, _dot(u, v)))
        return v

    for _ in range(k):
        start = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) for p in params]
        v = _normalize(deflate(start))
        value = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        for _ in range(iters):
            hv = deflate([h.detach() for h in hvp_from_gradients(grads, params, v)])
            new_value = _dot(v, hv)
            v = _normalize(hv)
            converged = abs(float(new_value - value)) <= tol * (abs(float(new_value)) + 1e-12)
            value = new_value
            if converged:
                break
        values.append(value)
        vectors.append(v)
    return torch.stack(values), vectors
