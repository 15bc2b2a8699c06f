"""The in-process driver: simulated clients train copies of the user's model locally with a trainlab optimizer,
and an aggregator (trainlab.federated) combines their updates.

Synchronous rounds follow a participation matrix [rounds, clients]; asynchronous runs follow
`asynchronous.arrival_schedule`. A client that raises during local training, or returns a non-finite update,
is dropped from that aggregation and listed in the run's ``failures`` (round, client, reason): it is never counted
as a participant, and the aggregator sees the round without it, exactly as a server would.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from trainlab import optim
from trainlab.federated.aggregator import Aggregator, ClientUpdate
from trainlab.federated.asynchronous import arrival_schedule

# client_batch(client, round, local_step) -> the batch that client trains on at that local step.
ClientBatch = Callable[[int, int, int], Any]
Loss = Callable[[nn.Module, Any], Tensor]


class ClientFailure(RuntimeError):
    """Raised by a simulated client that drops out in the middle of a round."""


@dataclass
class FederatedRun:
    model: nn.Module
    # One entry per aggregation: round, time, participants (aggregated), failed, and the metric when evaluated.
    history: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[int, int, str]] = field(default_factory=list)


@dataclass
class LocalTrainer:
    """Trains one client: ``local_steps`` steps of trainlab optimizer ``optimizer`` from a given global vector."""

    model: nn.Module
    loss: Loss
    client_batch: ClientBatch
    local_steps: int
    optimizer: str = "sgd"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    fail: Callable[[int, int], bool] | None = None  # fail(client, round): drop out after half the local steps

    def __post_init__(self) -> None:
        if not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ValueError(f"local_steps must be a positive integer, got {self.local_steps!r}")
        self.work = copy.deepcopy(self.model)  # the caller's model is never trained in place
        self.params = list(self.work.parameters())
        self.opt = optim.create(self.optimizer, self.params, **self.optimizer_args)

    def update(self, client: int, round: int, start: Tensor, proximal_mu: float = 0.0) -> Tensor:
        """``trained - start`` for ``client`` in ``round``; raises ClientFailure when the client drops out.
        ``proximal_mu > 0`` adds FedProx's proximal term ``mu/2 ||w - start||^2`` to the loss (its gradient
        ``mu (w - start)`` is added to the parameters' gradients)."""
        _load(self.params, start)  # a copy, never an alias: the optimizer writes the parameters in place
        self.opt.state.clear()  # every client starts its local round with fresh optimizer state
        opt = self.opt
        anchor = [t.view_as(p) for t, p in zip(start.split([p.numel() for p in self.params]), self.params, strict=True)]
        self.work.train()
        for step in range(self.local_steps):
            if self.fail is not None and step == self.local_steps // 2 and self.fail(client, round):
                raise ClientFailure(f"client {client} dropped out at local step {step}")
            for p in self.params:  # = opt.zero_grad(set_to_none=True), whose first call imports torch._dynamo
                p.grad = None  # (about 1.5 s of CPU in every fresh Flower ClientApp process)
            self.loss(self.work, self.client_batch(client, round, step)).backward()
            if proximal_mu:
                grads = [p.grad for p in self.params]
                torch._foreach_add_(grads, torch._foreach_sub(self.params, anchor), alpha=proximal_mu)
            opt.step()
        return parameters_to_vector(self.params).detach() - start


def _load(params: Iterable[Tensor], vector: Tensor) -> None:
    params = list(params)
    pieces = vector.split([p.numel() for p in params])
    with torch.no_grad():
        torch._foreach_copy_(params, [v.view_as(p) for v, p in zip(pieces, params, strict=True)])


def _collect(
    trainer: LocalTrainer, round: int, starts: dict[int, Tensor], run: FederatedRun
) -> tuple[list[ClientUpdate], list[int]]:
    updates, failed = [], []
    for client, start in starts.items():
        try:
            delta = trainer.update(client, round, start)
            if not bool(torch.isfinite(delta).all()):
                raise FloatingPointError("non-finite update")
        except (ClientFailure, FloatingPointError) as error:
            run.failures.append((round, client, str(error)))
            failed.append(client)
            continue
        updates.append(ClientUpdate(client, delta, 1.0, round))
    return updates, failed


def run_rounds(
    trainer: LocalTrainer,
    aggregator: Aggregator,
    participation: Tensor,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every: int = 1,
) -> FederatedRun:
    """Synchronous federated training: round t's participants are the True entries of ``participation[t]``."""
    if participation.ndim != 2 or participation.shape[1] != aggregator.num_clients:
        raise ValueError(f"participation must be [rounds, {aggregator.num_clients}] booleans")
    model = copy.deepcopy(trainer.model)
    x = parameters_to_vector(model.parameters()).detach().clone()
    run = FederatedRun(model)
    for t, row in enumerate(participation.tolist()):
        starts = {n: x for n, present in enumerate(row) if present}
        updates, failed = _collect(trainer, t, starts, run)
        x = x + aggregator.aggregate(updates).to(x.dtype)
        record = {"round": t, "time": float(t + 1), "participants": [u.client for u in updates], "failed": failed}
        if evaluate is not None and ((t + 1) % eval_every == 0 or t + 1 == len(participation)):
            _load(model.parameters(), x)
            record["metric"] = float(evaluate(model))
        run.history.append(record)
    _load(model.parameters(), x)
    return run


def run_asynchronous(
    trainer: LocalTrainer,
    aggregator: Aggregator,
    compute_times: Tensor,
    horizon: float,
    *,
    scheme: str,
    interval: float = 1.0,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every_time: float = 1.0,
) -> FederatedRun:
    """Clients with compute times ``compute_times`` train from the model they last received; the server
    aggregates on ``scheme``'s schedule (sync, async or fedfix) until time ``horizon``. The update of a client is
    ``returned - sent`` (the model it trained on), never ``returned - current``."""
    model = copy.deepcopy(trainer.model)
    x = parameters_to_vector(model.parameters()).detach().clone()
    sent = {n: x for n in range(aggregator.num_clients)}
    run = FederatedRun(model)
    next_eval = eval_every_time
    for k, (time, clients) in enumerate(arrival_schedule(scheme, compute_times, horizon, interval)):
        updates, failed = _collect(trainer, k, {n: sent[n] for n in clients}, run)
        x = x + aggregator.aggregate(updates).to(x.dtype)
        for n in clients:
            sent[n] = x
        record = {"round": k, "time": time, "participants": [u.client for u in updates], "failed": failed}
        if evaluate is not None and time >= next_eval - 1e-9:
            _load(model.parameters(), x)
            record["metric"] = float(evaluate(model))
            next_eval = (math.floor(time / eval_every_time + 1e-9) + 1) * eval_every_time
        run.history.append(record)
    _load(model.parameters(), x)
    return run
