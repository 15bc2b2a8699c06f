"""Server loops Flower has no strategy for, driven by a Grid's push/pull messages (LocalGrid or a SuperLink's).

- ``run_asynchronous_on_grid``: FedFix / asynchronous FedAvg with heterogeneous client speeds. Every client gets
  the current model at time 0; at each aggregation of ``asynchronous.arrival_schedule`` the server pulls the replies
  of the clients due, aggregates ``returned - sent`` (the model each trained on), and pushes the new model to them
  only. A client's message carries the index of the aggregation its reply is due at as ``server-round`` (minus 1),
  so its data are those the pure driver ``simulate.run_asynchronous`` uses.
- ``run_monna_on_grid``: MoNNA's machines as nodes. Each step the server sends machine ``i`` its model
  ``theta_i``; the node replies with its stochastic gradient at ``theta_i`` (``gradient_app``); the server plays
  the peer-to-peer network and applies ``MoNNA.step`` (momentum, half-step, nearest-neighbour averaging of the
  received half-steps and the Byzantine vectors). Momentum state therefore lives in the server's ``MoNNA``.

Client ``n`` is the ``n``-th smallest node id; messages name it as ``client-id``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from torch import Tensor

from trainlab.federated.aggregator import Aggregator, ClientUpdate
from trainlab.federated.asynchronous import arrival_schedule
from trainlab.federated.flower import from_vector, to_vector
from trainlab.federated.monna import MoNNA

GRADIENT = f"{MessageType.TRAIN}.gradient"  # MoNNA's message type (a ClientApp's @app.train("gradient"))


@dataclass
class GridRun:
    arrays: ArrayRecord  # the final global model (asynchronous) or the honest machines' mean (MoNNA)
    history: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[int, int, str]] = field(default_factory=list)


def _clients(grid: Grid, expected: int, timeout: float) -> list[int]:
    """The node ids of clients 0..expected-1 (sorted), once ``expected`` nodes are connected."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} nodes connected, {expected} needed")
        time.sleep(0.5)
    if len(nodes) != expected:
        raise ValueError(f"the grid has {len(nodes)} nodes; the run needs exactly {expected}")
    return nodes


def _pull(grid: Grid, ids: list[str], timeout: float) -> dict[str, Message]:
    """The replies to ``ids`` keyed by the message they answer (polls a remote grid until all are in)."""
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while True:
        for reply in grid.pull_messages([i for i in ids if i not in replies]):
            replies[reply.metadata.reply_to_message_id] = reply
        if len(replies) == len(ids):
            return replies
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(replies)} replies missing after {timeout} s")
        time.sleep(0.1)


def run_asynchronous_on_grid(
    grid: Grid,
    aggregator: Aggregator,
    arrays: ArrayRecord,
    compute_times: Tensor,
    horizon: float,
    *,
    scheme: str,
    interval: float = 1.0,
    timeout: float = 600.0,
    evaluate: Callable[[Tensor], float] | None = None,
    eval_every_time: float = 1.0,
) -> GridRun:
    """``aggregator`` (fedfix, async, fedavg for ``scheme="sync"``) over the clients' push/pull replies until
    ``horizon``; error replies and non-finite updates are listed in ``failures`` and never aggregated.
    ``evaluate(x)`` (the flattened global model, float64) is recorded as ``metric`` on the pure driver's
    schedule: at the first aggregation at or after every ``eval_every_time`` time units."""
    nodes = _clients(grid, aggregator.num_clients, timeout)
    schedule = arrival_schedule(scheme, compute_times, horizon, interval)
    due = {n: [k for k, (_, clients) in enumerate(schedule) if n in clients] for n in range(len(nodes))}
    x, template = to_vector(arrays)
    sent: dict[int, Tensor] = {}
    pending: dict[int, str] = {}

    def push(clients: list[int]) -> None:
        ready = [n for n in clients if due[n]]  # a client with no arrival before the horizon trains no more
        messages = []
        for n in ready:
            config = ConfigRecord({"server-round": due[n].pop(0) + 1, "client-id": n})
            content = RecordDict({"arrays": from_vector(x, template), "config": config})
            messages.append(Message(content, nodes[n], MessageType.TRAIN))
            sent[n] = x
        pending.update(zip(ready, grid.push_messages(messages), strict=True))

    run = GridRun(arrays)
    next_eval = eval_every_time
    push(list(range(len(nodes))))
    for k, (at, clients) in enumerate(schedule):
        ids = [pending.pop(n) for n in clients]
        replies = _pull(grid, ids, timeout)
        updates, failed = [], []
        for n, message_id in zip(clients, ids, strict=True):
            reply = replies[message_id]
            if reply.has_error():
                run.failures.append((k, n, reply.error.reason))
                failed.append(n)
                continue
            delta = to_vector(reply.content["arrays"])[0] - sent[n]
            if not bool(torch.isfinite(delta).all()):
                run.failures.append((k, n, "non-finite update"))
                failed.append(n)
                continue
            updates.append(ClientUpdate(n, delta, float(reply.content["metrics"]["num-examples"]), k))
        x = x + aggregator.aggregate(updates).double()
        record = {"round": k, "time": at, "participants": [u.client for u in updates], "failed": failed}
        if evaluate is not None and at >= next_eval - 1e-9:
            record["metric"] = float(evaluate(x))
            next_eval = (math.floor(at / eval_every_time + 1e-9) + 1) * eval_every_time
        run.history.append(record)
        push(clients)
    run.arrays = from_vector(x, template)
    return run


def gradient_app(gradient: Callable[[int, int, Tensor], Tensor]) -> ClientApp:
    """A ClientApp answering MoNNA's ``train.gradient`` messages: ``gradient(client, step, theta)`` at the sent
    model ``theta`` (a float64 vector)."""
    app = ClientApp()

    @app.train("gradient")
    def _gradient(message: Message, context: Context) -> Message:
        config = message.content["config"]
        theta, template = to_vector(message.content["arrays"])
        grad = gradient(int(config["client-id"]), int(config["step"]), theta).double()
        return Message(RecordDict({"arrays": from_vector(grad, template)}), reply_to=message)

    return app


def run_monna_on_grid(
    grid: Grid,
    machine: MoNNA,
    arrays: ArrayRecord,
    steps: int,
    lr: float,
    *,
    attack: Callable[[Tensor], Tensor] | None = None,
    timeout: float = 600.0,
    evaluate: Callable[[Tensor], float] | None = None,
    eval_every: int = 1,
) -> tuple[GridRun, Tensor]:
    """``steps`` MoNNA steps of the honest machines (one node each) from the common model ``arrays``;
    ``attack(params)`` gives the Byzantine vectors of a step from the honest models [honest, dim]. Returns the run
    (``arrays`` the honest machines' mean) and the honest machines' final models [honest, dim]. A machine whose
    gradient fails stops the run (a MoNNA step needs every honest machine). ``evaluate(mean)`` (the honest
    machines' mean model) is recorded as ``metric`` every ``eval_every`` steps and at the last."""
    nodes = _clients(grid, machine.num_clients, timeout)
    x, template = to_vector(arrays)
    params = x.expand(machine.num_clients, -1).to(machine.dtype).clone()
    run = GridRun(arrays)
    for step in range(steps):
        messages = [
            Message(
                RecordDict(
                    {
                        "arrays": from_vector(params[n].double(), template),
                        "config": ConfigRecord({"client-id": n, "step": step}),
                    }
                ),
                node,
                GRADIENT,
            )
            for n, node in enumerate(nodes)
        ]
        ids = list(grid.push_messages(messages))
        replies = _pull(grid, ids, timeout)
        grads = []
        for n, message_id in enumerate(ids):
            reply = replies[message_id]
            if reply.has_error():
                raise RuntimeError(f"MoNNA machine {n} failed at step {step}: {reply.error.reason}")
            grads.append(to_vector(reply.content["arrays"])[0])
        byzantine = None if attack is None else attack(params)
        params = machine.step(params, torch.stack(grads), lr, byzantine)
        record = {"round": step, "time": float(step + 1), "participants": list(range(len(nodes))), "failed": []}
        if evaluate is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            record["metric"] = float(evaluate(params.double().mean(0)))
        run.history.append(record)
    run.arrays = from_vector(params.double().mean(0), template)
    return run, params
