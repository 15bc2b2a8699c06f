"""MoNNA (Farhadkhani et al., "Robust Collaborative Learning with Linear Gradient Overhead", ICML 2023):
peer-to-peer SGD with local momentum and nearest-neighbour averaging (NNA) against up to f Byzantine machines.

Each honest machine i takes one stochastic gradient per step::

    m_i <- momentum m_i + (1 - dampening) g_i ;  h_i = theta_i - lr m_i        (local half-step)
    theta_i <- mean of the n - f received half-steps closest (L2) to h_i        (NNA; its own h_i included)

The defaults are the official code's (momentum = dampening = 0.99, so the effective step is lr * 0.01 and the
learning rate must be large, as the spec notes). NNA costs O(n^2 d) per step for n machines.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainlab.federated.registry import register_strategy
from trainlab.ranges import Between


def nearest_neighbour_average(received: Tensor, pivots: Tensor, f: int) -> Tensor:
    """For each row of ``pivots`` ([m, d]) the mean of the ``n - f`` rows of ``received`` ([n, d]) closest to it."""
    if received.ndim != 2 or pivots.ndim != 2 or received.shape[1] != pivots.shape[1]:
        raise ValueError("received and pivots must be 2-D with the same number of columns")
    n = received.shape[0]
    if not isinstance(f, int) or not 0 <= f < n:
        raise ValueError(f"f must be an integer in [0, {n}) for {n} received vectors, got {f!r}")
    distances = torch.cdist(pivots, received)
    nearest = distances.topk(n - f, dim=1, largest=False).indices
    mask = torch.zeros_like(distances).scatter_(1, nearest, 1.0)
    return mask @ received / (n - f)


class MoNNA:
    """The honest machines' side: momentum state [honest, dim] (tensor-only), one step at a time."""

    name = "monna"

    def __init__(
        self, num_clients: int, dim: int, dtype: torch.dtype, byzantine: int, momentum: float, dampening: float
    ) -> None:
        self.num_clients, self.dim, self.dtype = num_clients, dim, dtype
        self.byzantine, self.momentum, self.dampening = byzantine, momentum, dampening
        self.state = {"momentum": torch.zeros(num_clients, dim, dtype=dtype)}

    def step(self, params: Tensor, grads: Tensor, lr: float, byzantine_vectors: Tensor | None = None) -> Tensor:
        """The honest machines' next parameters ([honest, dim]) from theirs, their gradients and what the
        Byzantine machines send this step ([b, dim], any b; NNA discards ``byzantine`` vectors per machine)."""
        shape = (self.num_clients, self.dim)
        if params.shape != shape or grads.shape != shape:
            raise ValueError(f"params and grads must have shape {shape}")
        m = self.state["momentum"]
        m.mul_(self.momentum).add_(grads.to(self.dtype), alpha=1 - self.dampening)
        half = params.to(self.dtype) - lr * m
        received = half if byzantine_vectors is None else torch.cat([half, byzantine_vectors.to(self.dtype)])
        if received.shape[0] < 2 * self.byzantine + 1:
            raise ValueError(f"NNA needs at least 2f+1 = {2 * self.byzantine + 1} machines, got {received.shape[0]}")
        return nearest_neighbour_average(received, half, self.byzantine)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"momentum"} or state["momentum"].shape != (self.num_clients, self.dim):
            raise ValueError(f"monna: state must be {{'momentum': [{self.num_clients}, {self.dim}]}}")
        self.state["momentum"] = state["momentum"].to(self.dtype).clone()


@register_strategy(
    "monna",
    paper="Robust Collaborative Learning with Linear Gradient Overhead (Farhadkhani et al., ICML 2023)",
    summary="peer-to-peer momentum SGD; each machine averages its n-f nearest received models (NNA)",
    kind="peer-to-peer",
    # momentum = dampening = 0.99: the official reproduce.py's values.
    defaults={"byzantine": 1, "momentum": 0.99, "dampening": 0.99},
    ranges={
        "byzantine": Between(0, 10**6, integer=True),
        "momentum": Between(0.0, 0.9999),
        "dampening": Between(0.0, 0.9999),
    },
)
def _monna(
    *, num_clients: int, dim: int, dtype: torch.dtype, byzantine: int, momentum: float, dampening: float
) -> MoNNA:
    return MoNNA(num_clients, dim, dtype, byzantine, momentum, dampening)
