"""The in-process driver, participation patterns and partitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainlab.federated import create
from trainlab.federated.participation import participation_matrix
from trainlab.federated.partition import dirichlet_partition
from trainlab.federated.simulate import LocalTrainer, run_asynchronous, run_rounds

F64 = torch.float64
CENTRES = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [6.0, 2.0]], dtype=F64)


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.ones(2, dtype=F64))


def _loss(model: nn.Module, centre: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((model.x - centre) ** 2).sum()


def _trainer(fail=None, steps: int = 1) -> LocalTrainer:
    return LocalTrainer(Point(), _loss, lambda n, t, s: CENTRES[n], steps, "sgd", {"lr": 0.5}, fail)


def test_full_participation_fedavg_is_gradient_descent_on_the_mean():
    trainer = _trainer()
    run = run_rounds(trainer, create("fedavg", num_clients=4, dim=2, dtype=F64), torch.ones(3, 4, dtype=torch.bool))
    # one SGD step per client: x <- x - 0.5 (x - c_n); the mean over clients is x - 0.5 (x - mean c)
    x = torch.ones(2, dtype=F64)
    for _ in range(3):
        x = x - 0.5 * (x - CENTRES.mean(0))
    torch.testing.assert_close(run.model.x.detach(), x)
    assert torch.equal(trainer.model.x.detach(), torch.ones(2, dtype=F64))  # the caller's model is untouched


def test_client_failure_mid_round_is_reported_and_not_counted():
    trainer = _trainer(fail=lambda client, rnd: (client, rnd) == (1, 1), steps=2)
    agg = create("fedau", num_clients=4, dim=2, dtype=F64)
    run = run_rounds(trainer, agg, torch.ones(3, 4, dtype=torch.bool))
    assert [(r, c) for r, c, _ in run.failures] == [(1, 1)]
    assert "dropped out" in run.failures[0][2]
    assert run.history[1]["participants"] == [0, 2, 3] and run.history[1]["failed"] == [1]
    # FedAU saw client 1 absent in round 1: it recorded intervals 1 and 2, the others 1, 1 and 1
    assert agg.state["interval_sum"].tolist() == [3, 3, 3, 3]
    assert agg.state["interval_count"].tolist() == [3, 2, 3, 3]


def test_asynchronous_updates_are_returned_minus_sent():
    times = torch.tensor([1.0, 0.5, 0.5, 0.25])
    agg = create("async", num_clients=4, dim=2, dtype=F64, compute_times=times)
    run = run_asynchronous(_trainer(), agg, times, 0.5, scheme="async")
    x = torch.ones(2, dtype=F64)
    sent = {n: x for n in range(4)}
    for client in [3, 1, 2, 3]:  # arrival order up to time 0.5 (ties by client id)
        x = x - 0.5 * (sent[client] - CENTRES[client])
        sent[client] = x
    torch.testing.assert_close(run.model.x.detach(), x)
    assert [h["participants"] for h in run.history] == [[3], [1], [2], [3]]


@pytest.mark.parametrize("pattern", ["bernoulli", "markov", "cyclic"])
def test_participation_patterns_keep_the_rates(pattern):
    p = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    m = participation_matrix(pattern, p, 4000, seed=0)
    assert m.shape == (4000, 3) and m.dtype == torch.bool
    torch.testing.assert_close(m.double().mean(0), p, atol=0.05, rtol=0)


def test_markov_participation_is_correlated_in_time():
    m = participation_matrix("markov", torch.tensor([0.5], dtype=F64), 4000, seed=0, leave=0.05).flatten()
    assert float((m[1:] == m[:-1]).double().mean()) > 0.9  # a Bernoulli(0.5) pattern repeats half the time


def test_dirichlet_partition_covers_every_sample_once_and_skews_labels():
    labels = torch.arange(10).repeat(50)
    parts = dirichlet_partition(labels, 10, alpha=0.1, seed=0)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(500))
    dominant = [torch.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert sum(dominant) / 10 > 0.5  # alpha 0.1: most of a client's data is one class
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 10, alpha=0.0, seed=0)


def test_difficulty_ordered_partition_gives_later_clients_the_harder_samples_of_each_class():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(5, (400,), generator=gen)
    difficulty = torch.rand(400, generator=gen, dtype=torch.float64)
    plain = dirichlet_partition(labels, 6, alpha=1.0, seed=2)
    ordered = dirichlet_partition(labels, 6, alpha=1.0, seed=2, difficulty=difficulty)
    assert torch.equal(torch.cat(ordered).sort().values, torch.arange(400))
    for c in range(5):  # the same class counts per client, cut in ascending difficulty
        assert [int((labels[p] == c).sum()) for p in plain] == [int((labels[p] == c).sum()) for p in ordered]
        chunks = [difficulty[p[labels[p] == c]] for p in ordered]
        filled = [x for x in chunks if len(x)]
        assert all(a.max() <= b.min() for a, b in zip(filled, filled[1:], strict=False))
    with pytest.raises(ValueError, match="difficulty"):
        dirichlet_partition(labels, 6, alpha=1.0, seed=2, difficulty=difficulty[:10])
