"""FedAU (Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
Averaging", ICLR 2024): each participant's update is weighted by the running mean of its participation intervals,
an online estimate of ``1 / p_n`` that needs no knowledge of the participation probabilities.

Per client the server keeps three numbers: rounds since it last participated, and the sum and count of its
recorded intervals (the mean is all Algorithm 1 uses, so O(1) memory per client). A participant's weight uses
the intervals recorded *before* this round (1 while none is), then the interval ending now is recorded. A client
absent for ``cutoff`` rounds records an interval of ``cutoff`` and restarts its count (the paper's K, which bounds
the bias under Markovian or cyclic participation). The step is ``lr_global * sum_n w_n delta_n / N`` over all N
clients: the objective is the paper's equally weighted mean over clients, so sample counts are not used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainlab.federated.aggregator import Aggregator
from trainlab.federated.registry import register_strategy
from trainlab.ranges import Between


class FedAU(Aggregator):
    name = "fedau"

    def __init__(self, num_clients: int, dim: int, dtype: torch.dtype, cutoff: int, lr_global: float) -> None:
        super().__init__(num_clients, dim, dtype)
        self.cutoff, self.lr_global = cutoff, lr_global
        zeros = torch.zeros(num_clients, dtype=torch.long)
        self.state.update(since=zeros.clone(), interval_sum=zeros.clone(), interval_count=zeros.clone())

    def weights(self) -> Tensor:
        """Each client's current aggregation weight: its mean recorded interval, 1 before any is recorded."""
        count, total = self.state["interval_count"], self.state["interval_sum"]
        return torch.where(count > 0, total.to(self.dtype) / count.clamp(min=1), torch.ones((), dtype=self.dtype))

    def _aggregate(self, clients: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
        omega = self.weights()[clients]
        step = self.lr_global * (omega @ deltas) / self.num_clients
        since, total, count = self.state["since"], self.state["interval_sum"], self.state["interval_count"]
        present = torch.zeros(self.num_clients, dtype=torch.bool)
        present[clients] = True
        since += ~present  # absent clients: one more round without participating
        reached = ~present & (since >= self.cutoff)
        closed = present | reached
        total += torch.where(present, since + 1, since) * closed
        count += closed
        since.masked_fill_(closed, 0)
        return step


@register_strategy(
    "fedau",
    paper="A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging (Wang & Ji, 2024)",
    summary="weights each update by its client's mean participation interval (online 1/p estimate, cutoff K)",
    kind="server",
    # cutoff: the paper's experiments use K = 50 (the official config's default 100000 means "no cutoff").
    defaults={"cutoff": 50, "lr_global": 1.0},
    ranges={"cutoff": Between(1, 10**9, integer=True), "lr_global": Between(1e-6, 100.0)},
)
def _fedau(*, num_clients: int, dim: int, dtype: torch.dtype, cutoff: int, lr_global: float) -> FedAU:
    return FedAU(num_clients, dim, dtype, cutoff, lr_global)
