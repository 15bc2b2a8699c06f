"""Consensus ADMM for federated weighted least squares over noisy links with random scheduling, after Lari,
Arablouei, Gogineni & Werner, "Noise-Robust and Resource-Efficient ADMM-based Federated Learning" (2024).

Problem: ``min_w sum_k (y_k - X_k w)^T S_k (y_k - X_k w)``; client k holds ``A_k = X_k^T S_k X_k`` and
``b_k = X_k^T S_k y_k``. Every received vector carries additive Gaussian noise (``noise`` standard deviation).

- ``standard``: scaled consensus ADMM. A scheduled client receives ``z`` (noisy), sets
  ``w_k = (A_k + rho I)^{-1}(b_k + rho (z~ - u_k))`` and sends ``w_k + u_k`` (noisy); the server averages the last
  vector of every client; the scheduled clients receive the new ``z`` a second time (noisy) for
  ``u_k <- u_k + w_k - z~'``. Noise enters twice per iteration and accumulates in ``u_k``.
- ``dual-free``: our derivation from the paper's abstract. The paper's Algorithm 1 could not be found (searched:
  arXiv abstract pages and paper aggregators give only the abstract; no official code exists), so this is not a
  reproduction. Eliminating ``u_k`` with the optimality condition of the previous local update,
  ``rho u_k = rho (z_prev - z) - (A_k w_k - b_k)``, gives the local update
  ``w_k <- (A_k + rho I)^{-1}(A_k w_k + rho (2 z_k - z'_k))`` with ``z_k``, ``z'_k`` the client's last two received
  global models (the first update uses ``b_k + rho z_k``), and the vector sent,
  ``w_k + u_k = z_k - (A_k w_k - b_k) / rho``, keeps the data term in every iteration. A scheduled client receives
  one noisy copy of the global model per iteration (standard ADMM: two) and no dual variable carries noise from
  one iteration to the next (the abstract's first modification). With ``continue_local=True`` (the abstract's
  second modification) clients not scheduled keep running the local update with their last received model (the
  global model is then unchanged for them: ``z_k = z'_k``). Without noise and with every client scheduled this is
  the standard recursion exactly (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

VARIANTS = ("standard", "dual-free")


class NoisyConsensusADMM:
    """State (tensors only): server ``z``, the server's last received vector of each client, and per client
    ``w``, ``u`` (standard) or its last two received global models (dual-free)."""

    def __init__(
        self,
        A: Tensor,
        b: Tensor,
        *,
        rho: float = 1.0,
        noise: float = 0.0,
        variant: str = "dual-free",
        continue_local: bool = True,
        seed: int = 0,
    ) -> None:
        if A.ndim != 3 or A.shape[1] != A.shape[2] or b.shape != A.shape[:2]:
            raise ValueError("A must be [clients, d, d] and b [clients, d]")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not rho > 0 or not noise >= 0:
            raise ValueError(f"rho must be positive and noise non-negative, got rho={rho}, noise={noise}")
        if not isinstance(continue_local, bool):
            raise TypeError(f"continue_local must be a bool, got {continue_local!r}")
        self.A, self.b, self.rho, self.noise, self.variant = A, b, rho, noise, variant
        self.continue_local = continue_local
        k, d = b.shape
        eye = torch.eye(d, dtype=A.dtype)
        self.inverse = torch.linalg.inv(A + rho * eye)
        self.gen = torch.Generator().manual_seed(seed)
        zeros = torch.zeros(k, d, dtype=A.dtype)
        self.state = {
            "z": torch.zeros(d, dtype=A.dtype),
            "sent": zeros.clone(),
            "w": zeros.clone(),
            "u": zeros.clone(),
            "z_last": zeros.clone(),
            "z_before": zeros.clone(),
            "started": torch.zeros(k, dtype=torch.bool),
        }

    def _noisy(self, x: Tensor) -> Tensor:
        if self.noise == 0:
            return x.clone()
        return x + self.noise * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)

    def _solve(self, rhs: Tensor) -> Tensor:
        return (self.inverse @ rhs.unsqueeze(-1)).squeeze(-1)

    def step(self, scheduled: Tensor) -> Tensor:
        """One iteration with the clients ``scheduled`` (bool [clients]); returns the server's new ``z``."""
        s = self.state
        k = self.b.shape[0]
        if scheduled.shape != (k,) or scheduled.dtype != torch.bool:
            raise ValueError(f"scheduled must be a bool tensor of {k} entries")
        on = scheduled[:, None]
        if self.variant == "standard":
            z_recv = self._noisy(s["z"].expand(k, -1))
            w = self._solve(self.b + self.rho * (z_recv - s["u"]))
            s["w"] = torch.where(on, w, s["w"])
            s["sent"] = torch.where(on, self._noisy(s["w"] + s["u"]), s["sent"])
            s["z"] = s["sent"].mean(0)
            s["u"] = torch.where(on, s["u"] + s["w"] - self._noisy(s["z"].expand(k, -1)), s["u"])
            return s["z"]
        z_recv = self._noisy(s["z"].expand(k, -1))
        s["z_before"] = s["z_last"].clone()  # unscheduled clients then keep updating with their last model
        s["z_last"] = torch.where(on, z_recv, s["z_last"])
        started = s["started"][:, None]
        first = self._solve(self.b + self.rho * s["z_last"])
        later = self._solve((self.A @ s["w"].unsqueeze(-1)).squeeze(-1) + self.rho * (2 * s["z_last"] - s["z_before"]))
        active = on | started if self.continue_local else on  # keep updating once they have a model
        s["w"] = torch.where(active, torch.where(started, later, first), s["w"])
        s["started"] = s["started"] | scheduled
        residual = (self.A @ s["w"].unsqueeze(-1)).squeeze(-1) - self.b
        s["sent"] = torch.where(on, self._noisy(s["z_last"] - residual / self.rho), s["sent"])
        s["z"] = s["sent"].mean(0)
        return s["z"]
