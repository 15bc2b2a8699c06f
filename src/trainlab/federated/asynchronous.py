"""Asynchronous aggregation with heterogeneous client speeds, and FedFix (Fraboni, Vidal, Kameni & Lorenzi, "A
General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients Updates", JMLR 2023).

The server step is ``lr_global * sum_{i arrived} d_i (returned_i - sent_i)``, where ``sent_i`` is the (possibly
older) global model client i trained on. The arrival pattern weights client i by its arrival frequency, so
``d_i`` must undo it to optimise the true objective (importances ``p_i``):

- ``fedfix``: every ``interval`` time units aggregate the clients that finished since the last aggregation; a
  client with compute time ``tau_i`` arrives every ``ceil(tau_i / interval)`` aggregations, so
  ``d_i = ceil(tau_i / interval) p_i``.
- ``async``: aggregate each arrival alone; ``weighting="weight"`` uses ``d_i = (sum_j 1/tau_j) tau_i p_i``,
  ``"identical"`` uses ``d_i = 1`` (naive asynchronous FedAvg, biased toward fast clients).

``arrival_schedule`` says when each scheme aggregates and which clients arrive (official code's
``clients_time_schedule``); synchronous FedAvg waits for the slowest client every round.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trainlab.federated.aggregator import Aggregator
from trainlab.federated.registry import register_strategy
from trainlab.ranges import Between

SCHEMES = ("sync", "async", "fedfix")


def _check_times(compute_times: Tensor, num_clients: int | None = None) -> Tensor:
    times = torch.as_tensor(compute_times, dtype=torch.float64)
    if times.ndim != 1 or not bool((times > 0).all()) or (num_clients is not None and len(times) != num_clients):
        raise ValueError(f"compute_times must be {num_clients or 'the clients'} positive numbers")
    return times


def fedfix_periods(compute_times: Tensor, interval: float) -> Tensor:
    """Aggregations between two arrivals of each client under FedFix: ``ceil(tau_i / interval)``."""
    return torch.ceil(_check_times(compute_times) / interval - 1e-9).long().clamp(min=1)


def arrival_schedule(
    scheme: str, compute_times: Tensor, horizon: float, interval: float = 1.0
) -> list[tuple[float, list[int]]]:
    """``(time, clients aggregated)`` of each aggregation up to time ``horizon``, in time order. Clients restart
    at once with the newest model after being aggregated; under ``async`` simultaneous arrivals go one at a time."""
    times = _check_times(compute_times)
    if scheme == "sync":
        slowest = float(times.max())
        return [(k * slowest, list(range(len(times)))) for k in range(1, math.floor(horizon / slowest + 1e-9) + 1)]
    if scheme == "fedfix":
        periods = fedfix_periods(times, interval)
        steps = torch.arange(1, math.floor(horizon / interval + 1e-9) + 1)
        due = steps[:, None] % periods[None, :] == 0
        rows = zip(steps.tolist(), due, strict=True)
        return [(k * interval, torch.nonzero(row).flatten().tolist()) for k, row in rows if row.any()]
    if scheme == "async":
        arrivals = sorted(
            (k * float(t), i) for i, t in enumerate(times) for k in range(1, math.floor(horizon / float(t) + 1e-9) + 1)
        )
        return [(time, [i]) for time, i in arrivals]
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


class AsyncAggregator(Aggregator):
    """``lr_global * sum d_i delta_i`` with fixed per-client weights ``d`` (tensor state, so checkpointable)."""

    name = "async"

    def __init__(
        self,
        num_clients: int,
        dim: int,
        dtype: torch.dtype,
        weights: Tensor,
        lr_global: float,
        scheme: str,
        interval: float = 1.0,
    ) -> None:
        super().__init__(num_clients, dim, dtype)
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        self.lr_global, self.scheme, self.interval = lr_global, scheme, interval
        self.state["client_weights"] = weights.to(dtype)

    def _aggregate(self, clients: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
        return self.lr_global * (self.state["client_weights"][clients] @ deltas)


def _importances(num_clients: int) -> Tensor:
    return torch.full((num_clients,), 1.0 / num_clients, dtype=torch.float64)


@register_strategy(
    "fedfix",
    paper="A General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients Updates "
    "(Fraboni et al., JMLR 2023)",
    summary="aggregate every `interval` time units whoever finished, weighted ceil(tau_i/interval) p_i",
    kind="asynchronous",
    defaults={"interval": 0.5, "lr_global": 1.0},
    ranges={"interval": Between(1e-6, 1e6), "lr_global": Between(1e-6, 100.0)},
)
def _fedfix(
    *, num_clients: int, dim: int, dtype: torch.dtype, compute_times: Tensor, interval: float, lr_global: float
) -> AsyncAggregator:
    weights = fedfix_periods(_check_times(compute_times, num_clients), interval) * _importances(num_clients)
    return AsyncAggregator(num_clients, dim, dtype, weights, lr_global, "fedfix", interval)


@register_strategy(
    "async",
    paper="A General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients Updates "
    "(Fraboni et al., JMLR 2023)",
    summary="asynchronous FedAvg: each arrival aggregated alone, identical or speed-corrected weights",
    kind="asynchronous",
    defaults={"weighting": "identical", "lr_global": 1.0},
    ranges={"weighting": ("identical", "weight"), "lr_global": Between(1e-6, 100.0)},
)
def _async(
    *, num_clients: int, dim: int, dtype: torch.dtype, compute_times: Tensor, weighting: str, lr_global: float
) -> AsyncAggregator:
    times = _check_times(compute_times, num_clients)
    if weighting == "identical":
        weights = torch.ones(num_clients, dtype=torch.float64)
    else:
        weights = (1.0 / times).sum() * times * _importances(num_clients)
    return AsyncAggregator(num_clients, dim, dtype, weights, lr_global, "async")
