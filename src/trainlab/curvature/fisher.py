"""Empirical Fisher over a sliding window of gradients, inverted matrix-free by Woodbury (M-FAC).

With the last m gradients as the rows of ``G`` (m × d), ``F̂ = λI + GᵀG/m`` and

    F̂⁻¹ v = (v − Gᵀ (mλI + GGᵀ)⁻¹ G v) / λ,

so an inverse-Hessian-vector product costs O(dm + m³) and memory is the window itself (m × d) plus
the m × m Gram matrix: m times the parameter count, honestly a lot for m = 1024.
"""

from __future__ import annotations

import torch
from torch import Tensor


def woodbury_coefficients(gram: Tensor, gv: Tensor, damping: float, window: int) -> Tensor:
    """``c = (mλI + GGᵀ)⁻¹ G v`` from the Gram matrix ``GGᵀ`` and ``Gv``, solved in float64.

    The m × m system is tiny next to the d-sized products, and with λ ≈ 1e-5 it is ill-conditioned
    enough that float32 loses digits, so it is always solved in double precision by Cholesky.
    """
    system = gram.double() + window * damping * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    chol = torch.linalg.cholesky(system)
    return torch.cholesky_solve(gv.double().unsqueeze(-1), chol).squeeze(-1)


class FisherWindow:
    """Ring buffer of the last ``window`` flat gradients (zeros until filled, as in M-FAC's code)."""

    def __init__(
        self,
        dim: int,
        window: int,
        damping: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not damping > 0:
            raise ValueError(f"damping must be positive, got {damping!r}")
        self.window, self.damping = window, damping
        self.grads = torch.zeros(window, dim, dtype=dtype, device=device)
        self.gram = torch.zeros(window, window, dtype=dtype, device=device)
        self.count = 0

    def add(self, g: Tensor) -> None:
        """Replace the oldest gradient by ``g``: O(dm) to update the Gram matrix."""
        row = self.count % self.window
        self.grads[row] = g.reshape(-1)
        dots = self.grads @ self.grads[row]
        self.gram[row] = dots
        self.gram[:, row] = dots
        self.count += 1

    def ihvp(self, v: Tensor) -> Tensor:
        """``(λI + GᵀG/m)⁻¹ v``."""
        flat = v.reshape(-1)
        c = woodbury_coefficients(self.gram, self.grads @ flat, self.damping, self.window)
        return ((flat - self.grads.T @ c.to(flat.dtype)) / self.damping).reshape(v.shape)
