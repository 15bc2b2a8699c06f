"""FedAvg's server step over participants (McMahan et al., 2017): the weighted mean of the round's updates.

The pure reference that the simulations compare against; Flower runs use Flower's own FedAvg."""

from __future__ import annotations

import torch
from torch import Tensor

from trainlab.federated.aggregator import Aggregator
from trainlab.federated.registry import register_strategy
from trainlab.ranges import Between


class FedAvg(Aggregator):
    name = "fedavg"

    def __init__(self, num_clients: int, dim: int, dtype: torch.dtype, lr_global: float) -> None:
        super().__init__(num_clients, dim, dtype)
        self.lr_global = lr_global

    def _aggregate(self, clients: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
        if len(clients) == 0:
            return torch.zeros(self.dim, dtype=self.dtype)
        return self.lr_global * (weights @ deltas) / weights.sum()


@register_strategy(
    "fedavg",
    paper="Communication-Efficient Learning of Deep Networks from Decentralized Data (McMahan et al., 2017)",
    summary="weighted mean of the participants' updates (the baseline)",
    kind="server",
    defaults={"lr_global": 1.0},
    ranges={"lr_global": Between(1e-6, 100.0)},
)
def _fedavg(*, num_clients: int, dim: int, dtype: torch.dtype, lr_global: float) -> FedAvg:
    return FedAvg(num_clients, dim, dtype, lr_global)
