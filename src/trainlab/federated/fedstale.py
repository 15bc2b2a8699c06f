"""FedStale (Rodio & Neglia, "Leveraging stale client updates in federated learning", 2024): the server mixes the
round's fresh updates with the last (stale) update of every client, weighted by beta.

With client weights ``alpha_k`` (summing to 1), participation probabilities ``p_k`` and stale updates ``h_k``::

    D = sum_{k in S} (alpha_k / p_k) (delta_k - beta h_k) + beta sum_k alpha_k h_k

then ``h_k <- delta_k`` for the participants, and the step is ``lr_global * D``. beta = 0 is FedAvg with unbiased
weights, beta = 1 is FedVARP. The probabilities are given, or estimated online as each client's participation
frequency so far (the official code's unknown-probability mode estimates them too). The server stores one
update per client (O(N d) memory, as the paper states).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainlab.federated.aggregator import Aggregator
from trainlab.federated.registry import register_strategy
from trainlab.ranges import Between


class FedStale(Aggregator):
    name = "fedstale"

    def __init__(
        self,
        num_clients: int,
        dim: int,
        dtype: torch.dtype,
        beta: float,
        lr_global: float,
        client_weights: Tensor | None = None,
        probabilities: Tensor | None = None,
    ) -> None:
        super().__init__(num_clients, dim, dtype)
        self.beta, self.lr_global = beta, lr_global
        alpha = torch.ones(num_clients, dtype=dtype) if client_weights is None else client_weights.to(dtype)
        if alpha.shape != (num_clients,) or not bool((alpha > 0).all()):
            raise ValueError(f"client_weights must be {num_clients} positive numbers")
        if probabilities is not None:
            probabilities = probabilities.to(dtype)
            if probabilities.shape != (num_clients,) or not bool(((probabilities > 0) & (probabilities <= 1)).all()):
                raise ValueError(f"probabilities must be {num_clients} numbers in (0, 1]")
        self.alpha, self.probabilities = alpha / alpha.sum(), probabilities
        self.state.update(
            stale=torch.zeros(num_clients, dim, dtype=dtype), participations=torch.zeros(num_clients, dtype=torch.long)
        )

    def estimated_probabilities(self) -> Tensor:
        """Each client's participation frequency over the rounds so far (this one included), at least 1/rounds."""
        rounds = self.state["round"].to(self.dtype) + 1
        return self.state["participations"].to(self.dtype).clamp(min=1) / rounds

    def _aggregate(self, clients: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
        stale, alpha = self.state["stale"], self.alpha
        self.state["participations"][clients] += 1
        p = self.probabilities if self.probabilities is not None else self.estimated_probabilities()
        w = alpha[clients] / p[clients]
        direction = w @ (deltas - self.beta * stale[clients]) + self.beta * (alpha @ stale)
        stale[clients] = deltas
        return self.lr_global * direction


@register_strategy(
    "fedstale",
    paper="Leveraging stale client updates in federated learning (Rodio & Neglia, 2024)",
    summary="convex mix (beta) of fresh updates and the stored stale updates of every client",
    kind="server",
    # beta: the official code's history_coefficient default is 1.0 (FedVARP); the paper sweeps [0, 1].
    defaults={"beta": 1.0, "lr_global": 1.0},
    ranges={"beta": Between(0.0, 1.0), "lr_global": Between(1e-6, 100.0)},
)
def _fedstale(*, num_clients: int, dim: int, dtype: torch.dtype, beta: float, lr_global: float) -> FedStale:
    return FedStale(num_clients, dim, dtype, beta, lr_global)
