"""Non-IID data partitions for simulation: each class is split over the clients by Dirichlet(alpha) proportions
(small alpha: each client holds few classes; large alpha: near IID).

With ``difficulty`` (a score per sample, higher = harder) each class is cut in ascending difficulty instead of at
random, so client 0 holds the easiest samples of each of its classes and the last client the hardest: the
difficulty-ordered ("inc") partition of the curricula paper's official code, which gives the clients the
disparity in difficulty that its ordered client selection uses."""

from __future__ import annotations

import torch
from torch import Tensor


def dirichlet_partition(
    labels: Tensor, num_clients: int, alpha: float, seed: int, min_size: int = 1, difficulty: Tensor | None = None
) -> list[Tensor]:
    """Indices of ``labels`` for each client; every client gets at least ``min_size`` samples (redrawn up to
    100 times, else ValueError). ``difficulty``: cut each class in ascending difficulty (see the module doc)."""
    if labels.ndim != 1:
        raise ValueError("labels must be a 1-D tensor of class ids")
    if not isinstance(num_clients, int) or num_clients < 1 or num_clients * min_size > len(labels):
        raise ValueError(f"num_clients must be in [1, {len(labels) // max(min_size, 1)}], got {num_clients!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    if difficulty is not None and (difficulty.ndim != 1 or len(difficulty) != len(labels)):
        raise ValueError("difficulty must be a 1-D tensor with one score per label")
    gen = torch.Generator().manual_seed(seed)
    concentration = torch.full((num_clients,), float(alpha), dtype=torch.float64)
    for _ in range(100):
        parts: list[list[Tensor]] = [[] for _ in range(num_clients)]
        for c in labels.unique():
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            if difficulty is not None:
                idx = idx[torch.sort(difficulty[idx], stable=True).indices]
            # torch's Dirichlet sampler takes no generator: draw it from Gammas with our generator's seed.
            shares = _dirichlet(concentration, gen)
            cuts = (shares.cumsum(0) * len(idx)).round().long()[:-1].tolist()
            for client, chunk in enumerate(torch.tensor_split(idx, cuts)):
                parts[client].append(chunk)
        out = [torch.cat(p).sort().values for p in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ValueError(f"alpha={alpha} leaves a client with fewer than {min_size} samples; raise alpha or min_size")


def _dirichlet(concentration: Tensor, gen: torch.Generator) -> Tensor:
    seed = int(torch.randint(2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Dirichlet(concentration).sample()
