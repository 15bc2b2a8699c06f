"""Curriculum orderings and pacing, against the definitions written from the paper."""

from __future__ import annotations

import pytest
import torch

from trainlab.federated.curricula import (
    ClientCurriculum,
    client_difficulty,
    client_schedule,
    linear_pacing,
    local_pacing,
    order_by_difficulty,
    paced_indices,
)


def test_orderings():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert order_by_difficulty(scores, "curriculum").tolist() == [1, 3, 0, 2]
    assert order_by_difficulty(scores, "anti").tolist() == [2, 0, 3, 1]
    shuffled = order_by_difficulty(scores, "random", seed=1)
    assert sorted(shuffled.tolist()) == [0, 1, 2, 3]
    assert torch.equal(shuffled, order_by_difficulty(scores, "random", seed=1))
    with pytest.raises(ValueError, match="ordering"):
        order_by_difficulty(scores, "easy-first")


def test_linear_pacing_from_b_to_all_data_at_a_T():
    assert linear_pacing(0, 100, a=0.5, b=0.2) == pytest.approx(0.2)
    assert linear_pacing(25, 100, a=0.5, b=0.2) == pytest.approx(0.6)
    assert linear_pacing(50, 100, a=0.5, b=0.2) == 1.0 and linear_pacing(99, 100) == 1.0
    order = torch.arange(10)
    assert paced_indices(order, 0, 100).tolist() == [0, 1]
    assert len(paced_indices(order, 25, 100)) == 6
    with pytest.raises(ValueError, match="a and b"):
        linear_pacing(0, 10, a=0.0)


def test_local_pacing_is_the_official_linear_pacing_within_a_round():
    # int(b n + (n - b n) s / (a S)) with n 100, S 10, a 0.8, b 0.2, clipped to [min(32, n), n]
    expected = [max(32, min(100, int(20 + 80 * s / 8))) for s in range(10)]
    assert [local_pacing(s, 10, 100) for s in range(10)] == expected == [32, 32, 40, 50, 60, 70, 80, 90, 100, 100]
    assert local_pacing(0, 10, 12) == 12  # a client with fewer than 32 samples uses them all
    assert local_pacing(0, 10, 100, minimum=1) == 20
    with pytest.raises(ValueError, match="a > 0"):
        local_pacing(0, 10, 100, a=0.0)


def test_client_difficulty_is_the_mean_sample_score():
    scores = client_difficulty([torch.tensor([1.0, 3.0]), torch.tensor([0.5]), torch.tensor([2.0, 2.0, 5.0])])
    assert scores.tolist() == [2.0, 0.5, 3.0]
    with pytest.raises(ValueError, match="non-empty"):
        client_difficulty([torch.tensor([])])


def test_client_schedule_draws_rounds_from_a_growing_pool_of_the_easiest_clients():
    scores = torch.arange(10, dtype=torch.float64)  # client 0 the easiest
    matrix = client_schedule(scores, rounds=8, per_round=2, ordering="curriculum", a=0.8, b=0.2)
    # budget U = 16 updates; pool after u updates = int(2 + 8 u / 12.8): u 0 -> 2 clients (one round), u 2 -> 3
    # (rounds of 2 and 1), u 5 -> 5 (2, 2, 1), u 10 -> 8 (the last two rounds of 2)
    assert matrix.sum(1).tolist() == [2, 2, 1, 2, 2, 1, 2, 2]
    pools = [set(range(2)), *[set(range(3))] * 2, *[set(range(5))] * 3, *[set(range(8))] * 2]
    assert all(set(torch.nonzero(row).flatten().tolist()) <= pool for row, pool in zip(matrix, pools, strict=True))
    assert matrix[1:3].sum().item() == 3 and matrix[1:3].any(0)[:3].all()  # the pool of 3 used up once
    anti = client_schedule(scores, rounds=1, per_round=2, ordering="anti", a=0.8, b=0.2)
    assert set(torch.nonzero(anti[0]).flatten().tolist()) == {8, 9}
    # b = 1 with random ordering: plain random selection, each client once per pass of 5 rounds
    plain = client_schedule(scores, rounds=10, per_round=2, ordering="random", b=1.0, seed=3)
    assert plain[:5].sum(0).tolist() == [1] * 10 and plain[5:].sum(0).tolist() == [1] * 10
    with pytest.raises(ValueError, match="per_round"):
        client_schedule(scores, rounds=3, per_round=11, ordering="curriculum")


def test_client_curriculum_rescores_when_a_new_pool_is_drawn():
    calls = []

    def scores() -> torch.Tensor:  # e.g. the current global model's loss: it changes between pools
        calls.append(len(calls))
        return torch.tensor([0.0, 1.0, 2.0, 3.0]) if len(calls) == 1 else torch.tensor([3.0, 2.0, 0.0, 1.0])

    curriculum = ClientCurriculum(4, rounds=4, per_round=2, ordering="curriculum", a=1.0, b=0.5)
    # budget 8; pool after u updates = int(2 + 2 u / 8): 2 clients at u = 0 and at u = 2
    assert sorted(curriculum.next_round(scores).tolist()) == [0, 1] and len(calls) == 1
    assert sorted(curriculum.next_round(scores).tolist()) == [2, 3] and len(calls) == 2
    with pytest.raises(ValueError, match="4 client scores"):
        ClientCurriculum(4, 1, 2, "curriculum").next_round(lambda: torch.zeros(3))
    with pytest.raises(ValueError, match="ordering"):
        ClientCurriculum(4, 1, 2, "easy-first")
