"""COSMOS (Liu et al., "A Hybrid Adaptive Optimizer for Memory-Efficient Training of LLMs"): SOAP on the
leading eigen-subspace of the gradient's input covariance, Muon on the rest (lliu606/COSMOS @61de180).

Per matrix G (m×n, n the input side) the state is the full Nesterov first moment M (m×n), a tracked
basis U (n×r) of the EMA of GᵀG with its projected EMA S (r×r), and Adam's second moment V (m×r) in the
rotated coordinates: (mn + mr + nr + r²) floats. U follows one power-iteration/QR step per step, so it
needs no periodic SVD (only one at step 1):

    M ← β1 M + G                                  (no 1−β1, bias correction Σβ1^k)
    t=1: U = top-r eigvecs(GᵀG); S = (1−β2) Uᵀ GᵀG U
    t>1: U = QR(β2 U S + (1−β2) Gᵀ(GU)); T = U_oldᵀ U; S = β2 Tᵀ S T + (1−β2)(GU)ᵀ(GU)
    V ← β2 V + (1−β2)(GU)²
    G̃ = (G + β1 M)/(1 + β1 Σβ1^k)                 (Nesterov, the official default)
    A = (G̃U / (sqrt(V/(1−β2^t)) + ε)) Uᵀ
    R = NS5(G̃ − G̃UUᵀ); R ← √(mn) R/‖R‖_F
    D = A + γR;  direction = lr_ratio·√(mn)·D/‖D‖_F

Both normalizations add 1e-7 to the norm (as the official code does). When the basis covers every input
(r = n, e.g. rank 64 on ``Linear(64, 128)``), G̃ − G̃UUᵀ is exactly zero in exact arithmetic, so R = 0
and the direction is A alone. Computed in floating point that residual is rounding noise, which
Newton–Schulz and the √(mn) normalization would blow up into a full-size random term; we skip it. The
official COSMOS_optim.py has this flaw (it always orthogonalizes and normalizes the residual).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.sharding import gather_whole, matrix_shape, reshard
from trainlab.optim.transform import GradientTransform, State, new_step_counter, step_counts
from trainlab.optim.transforms.orthogonal import newton_schulz
from trainlab.optim.transforms.projection import resolve_rank

_NORM_EPS = 1e-7


def _svd_dtype(g: Tensor) -> Tensor:
    return g if g.dtype == torch.float64 else g.float()


class ScaleByCOSMOS(GradientTransform):
    """COSMOS's direction for 2-D (or flattened) matrices; ``rank`` as in GaLore (int or fraction of min(m, n),
    capped at n).

    Under FSDP2 each gradient is gathered whole once per step (one all-gather per matrix); every rank computes
    the same direction with replicated (plain) state and keeps its own slice of it."""

    name = "scale_by_cosmos"
    per_parameter = True
    hyperparameters = {"rank": 64, "gamma": 0.2, "lr_ratio": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        if param.ndim < 2:
            raise ValueError(f"{self.name} needs parameters with 2+ dimensions, got shape {tuple(param.shape)}")
        m, n = matrix_shape(param)
        r = min(resolve_rank(group["rank"], (m, n)), n)
        kw = {"dtype": param.dtype, "device": param.device}
        return {
            "step": new_step_counter(),
            "exp_avg": torch.zeros(m, n, **kw),
            "basis": torch.zeros(n, r, **kw),
            "basis_gram": torch.zeros(r, r, **kw),
            "exp_avg_sq": torch.zeros(m, r, **kw),
        }

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        beta1, beta2 = group["betas"]
        steps = step_counts(state)
        whole, layouts = gather_whole(updates)  # FSDP2: one explicit all-gather per matrix
        grads = [u.reshape(u.size(0), -1) for u in whole]
        mom = state["exp_avg"]
        torch._foreach_mul_(mom, beta1)
        torch._foreach_add_(mom, grads)
        out = []
        for i, (g, t) in enumerate(zip(grads, steps, strict=True)):
            u, s, v = state["basis"][i], state["basis_gram"][i], state["exp_avg_sq"][i]
            if t == 1:
                _, sv, vh = torch.linalg.svd(_svd_dtype(g), full_matrices=False)
                u.copy_(vh[: u.size(1)].mT)
                s.copy_(torch.diag(sv[: u.size(1)] ** 2) * (1 - beta2))
                gu = g @ u
            else:
                gu = g @ u
                q, _ = torch.linalg.qr(_svd_dtype(beta2 * u @ s + (1 - beta2) * g.mT @ gu))
                q = q.to(u.dtype)
                rot = u.mT @ q
                u.copy_(q)
                gu = g @ u
                s.copy_(beta2 * rot.mT @ s @ rot + (1 - beta2) * gu.mT @ gu)
            v.mul_(beta2).addcmul_(gu, gu, value=1 - beta2)
            bc1 = (1 - beta1**t) / (1 - beta1)
            nesterov = (g + beta1 * mom[i]) / (1 + beta1 * bc1)
            low = nesterov @ u
            denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
            d = (low / denom) @ u.mT
            size = math.sqrt(g.numel())
            if u.size(1) < g.size(1):  # else U spans every input: R = 0 exactly (see the module docstring)
                rest = newton_schulz(nesterov - low @ u.mT)
                rest.mul_(size / (torch.linalg.matrix_norm(rest) + _NORM_EPS))
                d.add_(rest, alpha=group["gamma"])
            d.mul_(group["lr_ratio"] * size / (torch.linalg.matrix_norm(d) + _NORM_EPS))
            out.append(reshard(d.reshape(whole[i].shape), layouts[i]))
        return out, state


def scale_by_cosmos() -> ScaleByCOSMOS:
    return ScaleByCOSMOS()
