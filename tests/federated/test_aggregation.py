"""The aggregation rules against reference equations written from the papers, in float64 on mock updates."""

from __future__ import annotations

import io

import pytest
import torch

from trainlab.federated import ClientUpdate, create, strategy_names
from trainlab.federated.asynchronous import arrival_schedule, fedfix_periods
from trainlab.federated.fedstale import FedStale
from trainlab.federated.monna import nearest_neighbour_average

F64 = torch.float64


def _rounds(num_clients: int, rounds: int, dim: int, seed: int = 0) -> list[list[ClientUpdate]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(rounds):
        present = torch.rand(num_clients, generator=gen) < torch.linspace(0.1, 0.9, num_clients)
        out.append(
            [
                ClientUpdate(n, torch.randn(dim, generator=gen, dtype=F64), 1.0, t)
                for n in range(num_clients)
                if present[n]
            ]
        )
    return out


def _fedau_reference(rounds, num_clients, dim, cutoff):
    """FedAU's Algorithm 1 as a plain loop over clients with the list of intervals (Wang & Ji, 2024)."""
    count = [0] * num_clients
    intervals: list[list[int]] = [[] for _ in range(num_clients)]
    steps = []
    for updates in rounds:
        by_client = {u.client: u.delta for u in updates}
        acc = torch.zeros(dim, dtype=F64)
        for n in range(num_clients):
            if n in by_client:
                omega = sum(intervals[n]) / len(intervals[n]) if intervals[n] else 1.0
                acc += omega * by_client[n]
                intervals[n].append(count[n] + 1)
                count[n] = 0
            else:
                count[n] += 1
                if count[n] >= cutoff:
                    intervals[n].append(count[n])
                    count[n] = 0
        steps.append(acc / num_clients)
    return steps


@pytest.mark.parametrize("cutoff", [3, 50])
def test_fedau_matches_algorithm_1(cutoff):
    rounds = _rounds(6, 40, 4)
    agg = create("fedau", num_clients=6, dim=4, dtype=F64, cutoff=cutoff)
    for updates, expected in zip(rounds, _fedau_reference(rounds, 6, 4, cutoff), strict=True):
        torch.testing.assert_close(agg.aggregate(updates), expected, rtol=1e-12, atol=1e-12)


def test_fedau_weights_estimate_inverse_participation():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.1, 0.25, 0.5, 1.0])
    agg = create("fedau", num_clients=4, dim=1, dtype=F64, cutoff=10**6)
    for t in range(4000):
        present = (torch.rand(4, generator=gen) < p).nonzero().flatten().tolist()
        agg.aggregate([ClientUpdate(n, torch.zeros(1, dtype=F64), 1.0, t) for n in present])
    torch.testing.assert_close(agg.weights(), 1 / p.double(), rtol=0.1, atol=0)


def _fedstale_reference(rounds, num_clients, dim, beta, p):
    """FedStale's aggregation as the official CentralizedAggregator.mix writes it (Rodio & Neglia, 2024):
    fresh = sum_S w_k delta_k, stale = sum_{not S} alpha_k h_k + sum_S (alpha_k - w_k) h_k, D = fresh + beta stale."""
    alpha = [1.0 / num_clients] * num_clients
    h = [torch.zeros(dim, dtype=F64) for _ in range(num_clients)]
    steps = []
    for updates in rounds:
        by_client = {u.client: u.delta for u in updates}
        fresh = sum((alpha[k] / p[k] * d for k, d in by_client.items()), torch.zeros(dim, dtype=F64))
        stale = torch.zeros(dim, dtype=F64)
        for k in range(num_clients):
            stale += (alpha[k] - alpha[k] / p[k]) * h[k] if k in by_client else alpha[k] * h[k]
        steps.append(fresh + beta * stale)
        for k, d in by_client.items():
            h[k] = d
    return steps


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fedstale_matches_official_mix(beta):
    rounds = _rounds(5, 30, 3, seed=2)
    p = [0.1, 0.3, 0.5, 0.7, 0.9]
    agg = FedStale(5, 3, F64, beta, 1.0, probabilities=torch.tensor(p, dtype=F64))
    for updates, expected in zip(rounds, _fedstale_reference(rounds, 5, 3, beta, p), strict=True):
        torch.testing.assert_close(agg.aggregate(updates), expected, rtol=1e-12, atol=1e-12)


def test_fedstale_beta_zero_with_full_participation_is_the_mean():
    agg = create("fedstale", num_clients=3, dim=2, dtype=F64, beta=0.0)
    deltas = torch.randn(3, 2, dtype=F64)
    step = agg.aggregate([ClientUpdate(n, deltas[n]) for n in range(3)])
    torch.testing.assert_close(step, deltas.mean(0))


def test_fedavg_is_the_weighted_mean():
    agg = create("fedavg", num_clients=4, dim=2, dtype=F64)
    step = agg.aggregate(
        [
            ClientUpdate(0, torch.tensor([1.0, 0.0], dtype=F64), 1.0),
            ClientUpdate(3, torch.tensor([0.0, 4.0], dtype=F64), 3.0),
        ]
    )
    torch.testing.assert_close(step, torch.tensor([0.25, 3.0], dtype=F64))


def test_nna_matches_sorting_by_distance():
    gen = torch.Generator().manual_seed(3)
    received = torch.randn(9, 5, generator=gen, dtype=F64)
    pivots = torch.randn(4, 5, generator=gen, dtype=F64)
    out = nearest_neighbour_average(received, pivots, f=3)
    for i in range(4):
        order = sorted(range(9), key=lambda j: float(((received[j] - pivots[i]) ** 2).sum()))
        torch.testing.assert_close(out[i], received[order[:6]].mean(0))


def test_monna_step_is_momentum_half_step_then_nna():
    gen = torch.Generator().manual_seed(4)
    params, grads = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)
    byz = 100 + torch.randn(2, 3, generator=gen, dtype=F64)
    m = create("monna", num_clients=5, dim=3, dtype=F64, byzantine=2, momentum=0.9, dampening=0.5)
    out = m.step(params, grads, 0.1, byz)
    half = params - 0.1 * 0.5 * grads
    torch.testing.assert_close(out, nearest_neighbour_average(torch.cat([half, byz]), half, 2))
    assert float(out.abs().max()) < 10  # the far Byzantine vectors were discarded
    out2 = m.step(params, grads, 0.1, byz)
    torch.testing.assert_close(
        out2, nearest_neighbour_average(torch.cat([params - 0.1 * 0.95 * grads, byz]), params - 0.1 * 0.95 * grads, 2)
    )


def test_fedfix_periods_weights_and_schedule():
    times = torch.tensor([1.0, 0.55, 0.5, 0.1])
    assert fedfix_periods(times, 0.5).tolist() == [2, 2, 1, 1]
    agg = create("fedfix", num_clients=4, dim=1, dtype=F64, compute_times=times, interval=0.5)
    torch.testing.assert_close(agg.state["client_weights"], torch.tensor([0.5, 0.5, 0.25, 0.25], dtype=F64))
    schedule = arrival_schedule("fedfix", times, 2.0, 0.5)
    assert schedule == [(0.5, [2, 3]), (1.0, [0, 1, 2, 3]), (1.5, [2, 3]), (2.0, [0, 1, 2, 3])]
    assert arrival_schedule("sync", times, 2.0) == [(1.0, [0, 1, 2, 3]), (2.0, [0, 1, 2, 3])]
    assert [c for _, c in arrival_schedule("async", torch.tensor([1.0, 0.4]), 1.0)] == [[1], [1], [0]]


def test_async_weight_correction():
    times = torch.tensor([1.0, 0.5, 0.25])
    agg = create("async", num_clients=3, dim=1, dtype=F64, compute_times=times, weighting="weight")
    # d_i = (sum_j 1/tau_j) tau_i p_i with p_i = 1/3: each client's d_i times its arrival rate 1/tau_i is p_i.
    torch.testing.assert_close(agg.state["client_weights"] / times.double(), torch.full((3,), 7 / 3, dtype=F64))
    step = agg.aggregate([ClientUpdate(2, torch.ones(1, dtype=F64))])
    torch.testing.assert_close(step, torch.tensor([7 / 3 * 0.25], dtype=F64))


@pytest.mark.parametrize("name", ["fedau", "fedstale", "fedavg"])
def test_state_checkpoints_resume_exactly(name):
    rounds = _rounds(4, 12, 3, seed=5)
    a = create(name, num_clients=4, dim=3, dtype=F64)
    for updates in rounds[:6]:
        a.aggregate(updates)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = create(name, num_clients=4, dim=3, dtype=F64)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for updates in rounds[6:]:
        assert torch.equal(a.aggregate(updates), b.aggregate(updates))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="cutoff"):
        create("fedau", num_clients=2, dim=1, cutoff=0)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        create("fedau", num_clients=2, dim=1, beta=0.5)
    with pytest.raises(ValueError, match="compute_times"):
        create("fedfix", num_clients=2, dim=1)
    with pytest.raises(ValueError, match="num_clients"):
        create("fedavg", num_clients=0, dim=1)
    agg = create("fedavg", num_clients=2, dim=1)
    with pytest.raises(ValueError, match="client ids"):
        agg.aggregate([ClientUpdate(2, torch.zeros(1))])
    with pytest.raises(ValueError, match="once per round"):
        agg.aggregate([ClientUpdate(1, torch.zeros(1)), ClientUpdate(1, torch.zeros(1))])
    assert set(strategy_names()) >= {"fedau", "fedstale", "monna", "fedfix", "async", "fedavg"}
