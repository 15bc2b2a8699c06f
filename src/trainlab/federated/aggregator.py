"""What a server aggregator consumes and keeps: client updates of one round, and tensor-only state.

An update is the flattened difference ``client model - model the client started from`` (a 1-D tensor). The
aggregator returns the global step ``s``; the server's new model is ``x + s``. Every aggregator's state is a dict
of tensors (participation history, stale updates, ...), so it checkpoints with ``torch.save`` and loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its id in ``[0, num_clients)``, its update, its weight (e.g. its number of samples)
    and the round whose global model it trained on."""

    client: int
    delta: Tensor
    weight: float = 1.0
    round: int = 0


class Aggregator(ABC):
    """Base of the server aggregators: checks a round's updates and owns the tensor state."""

    name = "aggregator"

    def __init__(self, num_clients: int, dim: int, dtype: torch.dtype) -> None:
        self.num_clients, self.dim, self.dtype = num_clients, dim, dtype
        self.state: dict[str, Tensor] = {"round": torch.zeros((), dtype=torch.long)}

    def stack(self, updates: Sequence[ClientUpdate]) -> tuple[Tensor, Tensor, Tensor]:
        """``(clients, deltas [n, dim], weights)`` of a round's updates after checking ids, shapes and weights."""
        if not all(isinstance(u, ClientUpdate) for u in updates):
            raise TypeError("updates must be a sequence of ClientUpdate")
        ids = [u.client for u in updates]
        if any(not 0 <= c < self.num_clients for c in ids):
            raise ValueError(f"client ids must be in [0, {self.num_clients}), got {sorted(ids)}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"a client may reply once per round; repeated ids in {sorted(ids)}")
        if any(u.delta.shape != (self.dim,) for u in updates):
            raise ValueError(f"every update must be a 1-D tensor of {self.dim} values")
        if any(not u.weight > 0 for u in updates):
            raise ValueError("update weights must be positive")
        clients = torch.tensor(ids, dtype=torch.long)
        if not updates:
            return clients, torch.zeros(0, self.dim, dtype=self.dtype), torch.zeros(0, dtype=self.dtype)
        deltas = torch.stack([u.delta.to(self.dtype) for u in updates])
        return clients, deltas, torch.tensor([float(u.weight) for u in updates], dtype=self.dtype)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """The global step of the next round from its updates (an empty round is allowed and counted)."""
        step = self._aggregate(*self.stack(updates))
        self.state["round"] += 1
        return step

    @abstractmethod
    def _aggregate(self, clients: Tensor, deltas: Tensor, weights: Tensor) -> Tensor: ...

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"{self.name}: state keys must be {sorted(self.state)}, got {sorted(state)}")
        for key, value in state.items():
            if value.shape != self.state[key].shape:
                raise ValueError(f"{self.name}: state {key!r} must have shape {tuple(self.state[key].shape)}")
            self.state[key] = value.to(self.state[key].dtype).clone()
