"""Curriculum orderings for federated clients ("When Do Curricula Work in Federated Learning?", Vahidian et al.,
ICCV 2023), as the spec reads them (no official code; the pacing parameterisation is the one of Wu et al.'s "When
do curricula work?", which the paper builds on):

- each client scores its samples by difficulty (e.g. the loss of an expert or of the current global model),
- orders them easy -> hard (``curriculum``), hard -> easy (``anti``) or at random (``random``),
- and at round t trains only on the first ``ceil(g(t) n_k)`` samples of its ordering, with the linear pacing
  ``g(t) = min(1, b + (1 - b) t / (a T))``: ``b`` the starting fraction, ``a`` the fraction of the T rounds after
  which all data is used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ORDERINGS = ("curriculum", "anti", "random")


def order_by_difficulty(scores: Tensor, ordering: str, seed: int = 0) -> Tensor:
    """Sample indices in training order from difficulty ``scores`` (higher = harder); ties keep index order."""
    if scores.ndim != 1:
        raise ValueError("scores must be a 1-D tensor, one difficulty per sample")
    if ordering == "curriculum":
        return torch.sort(scores, stable=True).indices
    if ordering == "anti":
        return torch.sort(scores, descending=True, stable=True).indices
    if ordering == "random":
        return torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")


def linear_pacing(round: int, total_rounds: int, a: float = 0.5, b: float = 0.2) -> float:
    """The fraction of its ordered data a client uses at ``round`` (0-based) of ``total_rounds``."""
    if not 0 < a <= 1 or not 0 < b <= 1:
        raise ValueError(f"a and b must be in (0, 1], got a={a}, b={b}")
    if not isinstance(total_rounds, int) or total_rounds < 1 or not 0 <= round:
        raise ValueError(f"need 0 <= round and total_rounds >= 1, got round={round}, total_rounds={total_rounds}")
    return min(1.0, b + (1 - b) * round / (a * total_rounds))


def paced_indices(order: Tensor, round: int, total_rounds: int, a: float = 0.5, b: float = 0.2) -> Tensor:
    """The samples (a prefix of ``order``) a client may draw its batches from at ``round``."""
    share = linear_pacing(round, total_rounds, a, b) * len(order)
    return order[: max(1, math.ceil(share - 1e-9))]  # 1e-9: 0.6 * 10 is 6.000000000000001 in floats
