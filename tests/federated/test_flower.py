"""The Flower wrappers on an in-process message grid (no Ray, no network)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

pytest.importorskip("flwr", reason="the federated extra (flwr) is a test dependency")

from flwr.app import ArrayRecord  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum  # noqa: E402

from trainlab.federated import create  # noqa: E402
from trainlab.federated.flower import LocalGrid, TrainlabStrategy, client_app, with_participation  # noqa: E402
from trainlab.federated.participation import heterogeneous_probabilities, participation_matrix  # noqa: E402
from trainlab.federated.simulate import LocalTrainer, run_rounds  # noqa: E402

F64 = torch.float64
N = 20


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(3, dtype=F64))


CENTRES = torch.randn(N, 3, generator=torch.Generator().manual_seed(0), dtype=F64)


def _trainer(fail=None) -> LocalTrainer:
    loss = lambda model, centre: 0.5 * ((model.x - centre) ** 2).sum()  # noqa: E731
    return LocalTrainer(Point(), loss, lambda n, t, s: CENTRES[n], 2, "sgd", {"lr": 0.3, "momentum": 0.0}, fail)


def _start(strategy, trainer, rounds):
    grid = LocalGrid(client_app(trainer), N)
    return strategy.start(grid, ArrayRecord(Point().state_dict()), num_rounds=rounds)


@pytest.mark.parametrize("name", ["fedau", "fedstale"])
def test_trainlab_strategy_on_the_grid_matches_the_pure_driver(name):
    part = participation_matrix("bernoulli", heterogeneous_probabilities(N, 0.1, 0.9), 5, seed=0)
    strategy = TrainlabStrategy(create(name, num_clients=N, dim=3, dtype=F64), part)
    started = time.perf_counter()
    result = _start(strategy, _trainer(), 5)
    assert time.perf_counter() - started < 10  # 20 clients x 5 rounds in process
    flower_x = result.arrays.to_torch_state_dict()["x"]
    pure = run_rounds(_trainer(), create(name, num_clients=N, dim=3, dtype=F64), part)
    torch.testing.assert_close(flower_x, pure.model.x.detach(), rtol=1e-12, atol=1e-12)


def test_client_failure_is_reported_not_counted():
    strategy = TrainlabStrategy(create("fedau", num_clients=N, dim=3, dtype=F64))
    result = _start(strategy, _trainer(fail=lambda c, r: (c, r) == (4, 1)), 3)
    assert [(r, c) for r, c, _ in strategy.failures] == [(1, 4)]  # trainlab round 1 is Flower's server round 2
    assert "dropped out" in strategy.failures[0][2]
    assert result.train_metrics_clientapp[2]["participants"] == N - 1
    assert result.train_metrics_clientapp[2]["failed"] == 1


@pytest.mark.parametrize("baseline", [FedAvg, FedMedian, Krum])
def test_flower_baselines_run_with_the_same_participation(baseline):
    part = torch.zeros(2, N, dtype=torch.bool)
    part[:, :6] = True
    strategy = with_participation(baseline, part)
    result = _start(strategy, _trainer(), 2)
    x = result.arrays.to_torch_state_dict()["x"]
    assert torch.isfinite(x).all() and not torch.equal(x, torch.zeros(3, dtype=F64))
    if baseline is FedAvg:  # two local steps from 0 give c (1 - 0.7^2) per client, averaged over clients 0-5
        x1 = CENTRES[:6].mean(0) * (1 - 0.7**2)
        torch.testing.assert_close(x, x1 + (CENTRES[:6].mean(0) - x1) * (1 - 0.7**2))


def test_fedprox_clients_add_the_proximal_gradient():
    """Flower's FedProx sends proximal-mu; each local SGD step is x <- x - lr ((x - c) + mu (x - x_global))."""
    from flwr.serverapp.strategy import FedProx

    part = torch.zeros(1, N, dtype=torch.bool)
    part[0, :4] = True
    strategy = with_participation(FedProx, part, proximal_mu=0.5)
    x = _start(strategy, _trainer(), 1).arrays.to_torch_state_dict()["x"]
    expected = []
    for c in CENTRES[:4]:
        w = torch.zeros(3, dtype=F64)
        for _ in range(2):
            w = w - 0.3 * ((w - c) + 0.5 * w)
        expected.append(w)
    torch.testing.assert_close(x, torch.stack(expected).mean(0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(x, CENTRES[:4].mean(0) * (1 - 0.7**2))  # mu = 0 would give this
