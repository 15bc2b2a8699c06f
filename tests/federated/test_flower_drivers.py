"""Asynchronous aggregation and MoNNA driven by the grid's push/pull messages, against the pure drivers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("flwr", reason="the federated extra (flwr) is a test dependency")

from flwr.app import ArrayRecord  # noqa: E402

from trainlab.federated import create  # noqa: E402
from trainlab.federated.flower import LocalGrid, client_app  # noqa: E402
from trainlab.federated.flower_drivers import gradient_app, run_asynchronous_on_grid, run_monna_on_grid  # noqa: E402
from trainlab.federated.simulate import LocalTrainer, run_asynchronous  # noqa: E402
from trainlab.runtime import batch_generator  # noqa: E402

F64 = torch.float64
N = 6
CENTRES = torch.randn(N, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
TIMES = torch.tensor([0.3, 0.5, 0.7, 1.1, 1.9, 3.2], dtype=F64)  # heterogeneous client speeds


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(3, dtype=F64))


def _trainer(fail=None) -> LocalTrainer:
    # The batch depends on the round (aggregation index), so a wrong round shows up in the model.
    batch = lambda n, t, s: CENTRES[n] * (1 + 0.1 * t)  # noqa: E731
    loss = lambda model, centre: 0.5 * ((model.x - centre) ** 2).sum()  # noqa: E731
    return LocalTrainer(Point(), loss, batch, 2, "sgd", {"lr": 0.3, "momentum": 0.0}, fail)


@pytest.mark.parametrize(
    ("scheme", "hp"), [("fedfix", {"interval": 0.5}), ("async", {"weighting": "weight"}), ("async", {})]
)
def test_asynchronous_on_the_grid_matches_the_pure_driver(scheme, hp):
    fail = lambda c, r: (7 * c + r) % 5 == 0  # noqa: E731  (some clients drop out mid-round)
    strategy = "fedfix" if scheme == "fedfix" else "async"

    def aggregator():
        return create(strategy, num_clients=N, dim=3, dtype=F64, compute_times=TIMES, **hp)

    interval = hp.get("interval", 1.0)
    grid = LocalGrid(client_app(_trainer(fail)), N)
    flower = run_asynchronous_on_grid(
        grid, aggregator(), ArrayRecord(Point().state_dict()), TIMES, 4.0, scheme=scheme, interval=interval
    )
    pure = run_asynchronous(_trainer(fail), aggregator(), TIMES, 4.0, scheme=scheme, interval=interval)
    torch.testing.assert_close(flower.arrays.to_torch_state_dict()["x"], pure.model.x.detach(), rtol=1e-12, atol=1e-12)
    assert flower.history == [{k: h[k] for k in flower.history[0]} for h in pure.history]
    assert [f[:2] for f in flower.failures] == [f[:2] for f in pure.failures] != []
    assert all("dropped out" in f[2] for f in flower.failures)


def _gradient(n: int, step: int, theta: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(3, generator=batch_generator(1, step * N + n), dtype=F64)
    return theta - CENTRES[n] + noise


def _attack(params: torch.Tensor) -> torch.Tensor:
    mean, std = params.mean(0), params.std(0)
    return (mean - 1.5 * std * torch.sign(mean) - 5).expand(2, -1)


def test_monna_on_the_grid_matches_the_pure_steps():
    def machine():
        return create("monna", num_clients=N, dim=3, dtype=F64, byzantine=2, momentum=0.9, dampening=0.5)

    grid = LocalGrid(gradient_app(_gradient), N)
    run, flower = run_monna_on_grid(grid, machine(), ArrayRecord(Point().state_dict()), 30, 0.2, attack=_attack)
    pure_machine, params = machine(), torch.zeros(N, 3, dtype=F64)
    for step in range(30):
        grads = torch.stack([_gradient(n, step, params[n]) for n in range(N)])
        params = pure_machine.step(params, grads, 0.2, _attack(params))
    torch.testing.assert_close(flower, params, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run.arrays.to_torch_state_dict()["x"], params.mean(0), rtol=1e-12, atol=1e-12)
    assert float((params.mean(0) - CENTRES.mean(0)).norm()) < 1.5  # the attack (shift -5) is resisted


def test_grid_drivers_refuse_a_grid_of_the_wrong_size():
    grid = LocalGrid(client_app(_trainer()), N + 1)
    aggregator = create("fedfix", num_clients=N, dim=3, dtype=F64, compute_times=TIMES)
    with pytest.raises(ValueError, match="needs exactly 6"):
        run_asynchronous_on_grid(grid, aggregator, ArrayRecord(Point().state_dict()), TIMES, 2.0, scheme="fedfix")
