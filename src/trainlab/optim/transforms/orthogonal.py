"""Orthogonalized and norm-controlled updates: Muon, AuON and ⊥Grad (OrthoGrad).

- `newton_schulz`: Keller Jordan's quintic Newton–Schulz iteration, which maps a matrix to a nearby
  semi-orthogonal one (singular values pushed into roughly [0.7, 1.2]) with matrix products only.
- `scale_by_muon`: Nesterov momentum, then Newton–Schulz per weight matrix (KellerJordan/Muon, muon.py).
- `scale_by_auon`: Nesterov momentum, then Frobenius normalization and the cosh "RMS brake"
  (ryyzn9/AuON): linear time, no semi-orthogonal matrix.
- `orthogonalize_gradient`: ⊥Grad, which removes the gradient's component along the weight so the
  optimizer cannot lower the loss by merely scaling the weights (Prieto et al., "Grokking at the Edge of
  Numerical Stability").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import GradientTransform, Scratch, State

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _ns_dtype(x: Tensor) -> torch.dtype:
    """Newton–Schulz precision: bfloat16 on accelerators (as in muon.py, where it is fast and stable),
    float32 on the CPU (bfloat16 matmuls are about 2x faster there only on CPUs with bf16 dot products,
    AVX512-BF16 or AMX, and many times slower elsewhere), float64 kept."""
    if x.dtype == torch.float64:
        return torch.float64
    return torch.float32 if x.device.type == "cpu" else torch.bfloat16


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """Approximately orthogonalize ``g`` (shape ``(..., rows, cols)``; leading dims are a batch).

    Each matrix is divided by its Frobenius norm (so its spectral norm is at most 1), transposed to be
    wide (so ``X Xᵀ`` is the smaller Gram matrix), then iterated ``X ← aX + (bA + cA²)X`` with
    ``A = X Xᵀ``. The result has ``g``'s dtype. ``dtype`` is the precision of the iteration (default:
    see `_ns_dtype`).

    Each iteration is three (batched) matrix products into buffers allocated once: ``A = X Xᵀ``,
    ``B = bA + cA·A`` and ``X' = aX + B·X``, the scalings folded into the products (``baddbmm``) instead
    of five extra elementwise passes and as many temporaries.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    a, b, c = NS_COEFFICIENTS
    tall = g.size(-2) > g.size(-1)
    x = (g.mT if tall else g).to(dtype or _ns_dtype(g), memory_format=torch.contiguous_format, copy=True)
    x.div_(torch.linalg.matrix_norm(x, keepdim=True) + eps)
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    gram = x.new_empty(x.size(0), x.size(1), x.size(1))
    poly = torch.empty_like(gram)
    nxt = torch.empty_like(x)
    for _ in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
        torch.baddbmm(x, poly, x, beta=a, alpha=1.0, out=nxt)
        x, nxt = nxt, x
    x = x.reshape(*batch_shape, *x.shape[-2:])
    if tall:
        x = x.mT
    return x.to(g.dtype)


def _as_matrices(updates: list[Tensor], transform: str) -> list[Tensor]:
    """View each update as a matrix ``(out, -1)``: conv filters are flattened as in muon.py."""
    for u in updates:
        if u.ndim < 2:
            raise ValueError(
                f"{transform} needs parameters with 2+ dimensions, got shape {tuple(u.shape)}; route "
                "vectors (biases, norm gains) to another chain, e.g. with trainlab.optim.matrices_to"
            )
    return [u.reshape(u.size(0), -1) for u in updates]


def _shape_scale(m: Tensor) -> float:
    # max(1, rows/cols)^0.5 on the (flattened) matrix. muon.py uses the last two dims of the unflattened
    # tensor, which for a conv filter are its kernel dims; the flattened matrix is what is orthogonalized.
    return max(1.0, m.size(0) / m.size(1)) ** 0.5


def _nesterov_momentum(updates: list[Tensor], state: State, group: Mapping[str, Any]) -> list[Tensor]:
    """``B ← βB + (1−β)G``; returns ``(1−β)G + βB`` (Nesterov) or ``B``, as new tensors."""
    beta = group["momentum"]
    bufs = state["momentum_buffer"]
    torch._foreach_lerp_(bufs, updates, 1 - beta)
    if group["nesterov"]:
        return list(torch._foreach_lerp(updates, bufs, beta))
    return list(bufs)


class _MomentumTransform(GradientTransform):
    """Shared state of Muon and AuON: one momentum buffer per parameter, starting at zero."""

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format)}


class ScaleByMuon(_MomentumTransform):
    """Muon's direction: Nesterov momentum, orthogonalized by Newton–Schulz, times max(1, rows/cols)^½.

    Matrices of the same shape are orthogonalized together as one batched matmul.
    """

    name = "scale_by_muon"
    hyperparameters = {"momentum": 0.95, "nesterov": True, "ns_steps": 5}

    def __init__(self, ns_dtype: torch.dtype | None = None) -> None:
        # None: `_ns_dtype`'s choice. torch.bfloat16 on a CPU with bf16 dot products (AVX512-BF16, AMX)
        # halves the step time, at muon.py's (and pytorch_optimizer's) bf16 precision.
        self.ns_dtype = ns_dtype

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        mats = _as_matrices(_nesterov_momentum(updates, state, group), self.name)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(mats):
            by_shape.setdefault(tuple(m.shape), []).append(i)
        out: list[Tensor] = [torch.empty(0)] * len(mats)
        for idx in by_shape.values():
            ortho = newton_schulz(torch.stack([mats[i] for i in idx]), group["ns_steps"], dtype=self.ns_dtype)
            scale = _shape_scale(mats[idx[0]])
            for i, o in zip(idx, ortho.unbind(0), strict=True):
                out[i] = o.mul_(scale).reshape(updates[i].shape)
        return out, state


class ScaleByAuON(_MomentumTransform):
    """AuON's direction: ``X = U/(‖U‖_F + 1e-7)``, then ``X / sqrt(mean(cosh(γX)²))``, times scale.

    ``scale = max(1, rows/cols)^½`` as in Muon. This is the normalized form of the paper and of the
    c87b862 training script, so ‖update‖_F ≈ scale (a Frobenius trust region). The packaged
    ``AuON.step`` (bba2e82) divides the *unnormalized* momentum by the cosh factor instead, which makes
    its update ≈ the raw momentum; we do not follow it.
    """

    name = "scale_by_auon"
    per_parameter = True
    hyperparameters = {"momentum": 0.95, "nesterov": True, "gamma": 1.5}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        gamma = group["gamma"]
        mom = _nesterov_momentum(updates, state, group)
        scales = [_shape_scale(m) for m in _as_matrices(mom, self.name)]
        work = [u if u.dtype == torch.float64 else u.float() for u in mom]  # cosh sums overflow in fp16
        norms = torch._foreach_add(torch._foreach_norm(work), 1e-7)
        x = torch._foreach_div(work, norms)
        # mean(cosh(γx)²) = (Σ e^{2γx} + Σ e^{-2γx} + 2n) / 4n, and a sum of positive terms is an ℓ1 norm,
        # so the whole brake is foreach kernels (|x| ≤ 1 keeps the exponentials far from overflow).
        two_gamma_x = torch._foreach_mul(x, 2 * gamma)
        pos = torch._foreach_norm(torch._foreach_exp(two_gamma_x), 1)
        neg = torch._foreach_norm(torch._foreach_exp(torch._foreach_neg(two_gamma_x)), 1)
        sizes = [float(u.numel()) for u in work]
        mean_cosh_sq = torch._foreach_add(pos, neg)
        torch._foreach_add_(mean_cosh_sq, [2 * n for n in sizes])
        torch._foreach_div_(mean_cosh_sq, [4 * n for n in sizes])
        factor = torch._foreach_reciprocal(torch._foreach_sqrt(mean_cosh_sq))
        torch._foreach_mul_(factor, scales)
        torch._foreach_mul_(x, factor)
        return [xi.to(u.dtype) for xi, u in zip(x, updates, strict=True)], state


class OrthogonalizeGradient(GradientTransform):
    """⊥Grad: ``g⊥ = g − (w·g)/(w·w + 1e-30) w`` per whole tensor, rescaled to ‖g‖ (official orthograd.py).

    Stateless. A zero weight tensor leaves its gradient unchanged; do not zero-initialize the weights
    you want projected.
    """

    name = "orthogonalize_gradient"
    per_parameter = True

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        # One dot-product kernel per tensor: torch has no foreach reduction to a signed sum.
        dots = [torch.vdot(w.reshape(-1), g.reshape(-1)) for w, g in zip(params, updates, strict=True)]
        w_norms = torch._foreach_norm(params)
        w_sq = torch._foreach_add(torch._foreach_mul(w_norms, w_norms), 1e-30)
        coefs = torch._foreach_div(dots, w_sq)
        ortho = torch._foreach_sub(updates, torch._foreach_mul(params, coefs))
        ortho_norms = torch._foreach_add(torch._foreach_norm(ortho), 1e-30)
        rescale = torch._foreach_div(torch._foreach_norm(updates), ortho_norms)
        torch._foreach_mul_(ortho, rescale)
        return Scratch(ortho), state


def scale_by_muon(ns_dtype: torch.dtype | None = None) -> ScaleByMuon:
    return ScaleByMuon(ns_dtype)


def scale_by_auon() -> ScaleByAuON:
    return ScaleByAuON()


def orthogonalize_gradient() -> OrthogonalizeGradient:
    return OrthogonalizeGradient()
