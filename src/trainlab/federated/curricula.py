"""Curriculum orderings for federated clients ("When Do Curricula Work in Federated Learning?", Vahidian et al.,
ICCV 2023).

Two readings live here:

- the spec's (written before the official code was found): ``linear_pacing`` / ``paced_indices`` pace across the
  rounds, ``g(t) = min(1, b + (1 - b) t / (a T))`` of the ordered data at round t;
- the paper's official code (its repository's client class, ``ClientScheduler`` and ``pacing_fn``, read through
  the search tool; no code copied): ``local_pacing`` paces within each round's local training, and
  ``client_schedule`` is the paper's ordered client selection. See the comment above ``local_pacing``.

Every reading orders a client's samples by a difficulty score (higher = harder) easy -> hard (``curriculum``),
hard -> easy (``anti``) or at random (``random``) with ``order_by_difficulty``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


# ---- The official code's reading (github: the paper's repository, `src/client`, `ClientScheduler`, `pacing_fn`) ----
#
# Data: each participating client scores its samples at the start of its local training (the loss of an expert
# model, of the received global model, of its own last local model, or the sum of the last two) and orders them;
# the pacing runs over the local steps of that round: at local step s of S the client draws its batches from the
# first ``int(b n + (1 - b) n s / (a S))`` samples of its ordering (at least ``min(minimum, n)``).
# Clients ("ordered client selection"): the server scores each client by the mean score of its samples, orders the
# clients the same three ways, and draws the rounds' participants from a pool of the first
# ``int(b K + (1 - b) K u / (a U))`` clients of that ordering, ``u`` client updates done of a budget ``U`` (rounds
# x clients per round): the pool is shuffled and split into rounds of ``per_round`` clients (the last may be
# smaller); when it is used up the clients are ordered again and a new pool is drawn.


def local_pacing(step: int, total_steps: int, n: int, a: float = 0.8, b: float = 0.2, minimum: int = 32) -> int:
    """How many of its ``n`` ordered samples a client may draw from at local step ``step`` (0-based) of
    ``total_steps``: ``int(b n + (n - b n) step / (a total_steps))``, clipped to ``[min(minimum, n), n]``
    (the official defaults of the paper's scripts: a = 0.8, b = 0.2, at least 32 samples)."""
    if not 0 < a or not 0 < b <= 1:
        raise ValueError(f"need a > 0 and b in (0, 1], got a={a}, b={b}")
    if not isinstance(total_steps, int) or total_steps < 1 or not 0 <= step or n < 1:
        raise ValueError(f"need 0 <= step, total_steps >= 1 and n >= 1, got {step}, {total_steps}, {n}")
    size = int(b * n + (n - b * n) * step / (a * total_steps) + 1e-9)
    return max(min(minimum, n), min(size, n))


def client_difficulty(sample_scores: list[Tensor]) -> Tensor:
    """Each client's score for the client ordering: the mean score of its samples."""
    if not sample_scores or any(s.ndim != 1 or len(s) == 0 for s in sample_scores):
        raise ValueError("sample_scores must be one non-empty 1-D tensor of sample scores per client")
    return torch.stack([s.double().mean() for s in sample_scores])


class ClientCurriculum:
    """The paper's ordered client selection, one round at a time: ``next_round(scores)`` returns the round's
    participants; ``scores()`` (each client's difficulty, e.g. ``client_difficulty`` of its samples' losses under
    the current global model) is called whenever a new pool is drawn. State: client updates done, rounds drawn,
    the rounds left of the current pool."""

    def __init__(
        self,
        num_clients: int,
        rounds: int,
        per_round: int,
        ordering: str,
        a: float = 0.8,
        b: float = 0.2,
        seed: int = 0,
    ) -> None:
        if not isinstance(rounds, int) or rounds < 1 or not isinstance(per_round, int):
            raise ValueError(f"need rounds >= 1 and an integer per_round, got {rounds}, {per_round}")
        if not 1 <= per_round <= num_clients:
            raise ValueError(f"need 1 <= per_round <= {num_clients}, got {per_round}")
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
        local_pacing(0, 1, num_clients, a, b)  # checks a and b
        self.num_clients, self.per_round, self.ordering, self.a, self.b, self.seed = (
            num_clients,
            per_round,
            ordering,
            a,
            b,
            seed,
        )
        self.budget = rounds * per_round
        self.gen = torch.Generator().manual_seed(seed)
        self.done, self.passes = 0, 0
        self.pending: list[Tensor] = []

    def next_round(self, scores: Callable[[], Tensor]) -> Tensor:
        """The clients (indices) of the next round."""
        if not self.pending:
            client_scores = scores()
            if client_scores.shape != (self.num_clients,):
                raise ValueError(f"scores() must return {self.num_clients} client scores")
            order = order_by_difficulty(client_scores, self.ordering, seed=self.seed * 100_003 + self.passes)
            self.passes += 1
            pool = order[: local_pacing(self.done, self.budget, self.num_clients, self.a, self.b, minimum=1)]
            self.pending = list(pool[torch.randperm(len(pool), generator=self.gen)].split(self.per_round))
        chosen = self.pending.pop(0)
        self.done += len(chosen)
        return chosen


def client_schedule(
    client_scores: Tensor,
    rounds: int,
    per_round: int,
    ordering: str,
    a: float = 0.8,
    b: float = 0.2,
    seed: int = 0,
) -> Tensor:
    """The participants of each round [rounds, clients] (bool) under the paper's ordered client selection from
    fixed client scores (e.g. an expert's). ``ordering="random"`` with ``b=1`` is plain random selection: every
    client once per pass, in shuffled rounds of ``per_round``."""
    k = len(client_scores)
    curriculum = ClientCurriculum(k, rounds, per_round, ordering, a, b, seed)
    matrix = torch.zeros(rounds, k, dtype=torch.bool)
    for row in range(rounds):
        matrix[row, curriculum.next_round(lambda: client_scores)] = True
    return matrix
