"""Curriculum orderings and pacing, against the definitions written from the paper."""

from __future__ import annotations

import pytest
import torch

from trainlab.federated.curricula import linear_pacing, order_by_difficulty, paced_indices


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
