"""Who participates in each round: the patterns of the FedAU paper's experiments, drawn up front as a boolean
matrix [rounds, clients] from a seed, so a simulation is reproducible and its participation can be reported.

- ``bernoulli``: client n participates independently each round with probability ``p_n``.
- ``markov``: a two-state chain per client with stationary probability ``p_n``; a participant leaves with
  probability ``leave`` (our parameterisation: the join probability ``leave p_n / (1 - p_n)`` keeps ``p_n``).
- ``cyclic``: client n participates in ``round(p_n period)`` consecutive rounds of every ``period``, from a
  random phase.

The server never sees ``p``: that is the "unknown participation statistics" setting.
"""

from __future__ import annotations

import torch
from torch import Tensor

PATTERNS = ("bernoulli", "markov", "cyclic")


def participation_matrix(
    pattern: str,
    probabilities: Tensor,
    rounds: int,
    seed: int,
    *,
    leave: float = 0.05,
    period: int = 20,
) -> Tensor:
    """A bool tensor [rounds, clients]: entry (t, n) says whether client n participates in round t."""
    p = torch.as_tensor(probabilities, dtype=torch.float64)
    if p.ndim != 1 or not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError("probabilities must be a 1-D tensor of numbers in (0, 1]")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    gen = torch.Generator().manual_seed(seed)
    if pattern == "bernoulli":
        return torch.rand(rounds, len(p), generator=gen, dtype=torch.float64) < p
    if pattern == "markov":
        if not 0 < leave <= 1:
            raise ValueError(f"leave must be in (0, 1], got {leave!r}")
        join = leave * p / (1 - p).clamp(min=1e-12)
        if bool((join > 1 + 1e-12).any()):
            raise ValueError(f"markov: leave={leave} is too large for probabilities up to {float(p.max()):.3g}")
        uniform = torch.rand(rounds, len(p), generator=gen, dtype=torch.float64)
        state = torch.rand(len(p), generator=gen, dtype=torch.float64) < p  # start from the stationary law
        rows = []
        for u in uniform:  # sequential in rounds, vectorized over clients
            state = torch.where(state, u >= leave, u < join)
            rows.append(state)
        return torch.stack(rows)
    if pattern == "cyclic":
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be a positive integer, got {period!r}")
        active = (p * period).round().clamp(min=1).long()
        phase = torch.randint(period, (len(p),), generator=gen)
        position = (torch.arange(rounds)[:, None] + phase[None, :]) % period
        return position < active[None, :]
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def heterogeneous_probabilities(num_clients: int, low: float = 0.02, high: float = 0.9) -> Tensor:
    """Participation probabilities spread evenly over [low, high] (client 0 the rarest), as in the spec's
    FedAU check; pair them with data so that rare clients hold different data, which is what biases FedAvg."""
    if not 0 < low <= high <= 1:
        raise ValueError(f"need 0 < low <= high <= 1, got low={low}, high={high}")
    return torch.linspace(low, high, num_clients, dtype=torch.float64)
