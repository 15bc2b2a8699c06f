"""Flower wrappers (Message API of flwr 1.42, pinned minor: the in-process grid builds on Flower's Grid base).

- ``TrainlabStrategy`` subclasses Flower's ``FedAvg`` and overrides ``configure_train`` (participants of the round
  from a participation matrix; the current global model is remembered) and ``aggregate_train`` (the replies'
  ``returned - sent`` updates go to a pure trainlab Aggregator, which returns the global step).
- ``with_participation(cls)`` gives any Flower strategy (FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg,
  Krum, ...) the same participation, so Flower's own aggregation serves as the baseline unchanged.
- ``client_app(trainer)`` is a ``ClientApp`` whose train function runs a trainlab ``LocalTrainer``.
- ``LocalGrid`` runs a ``ClientApp`` in this process, one node per client (no Ray, no network). A client that
  raises replies with an error message; strategies list it in ``failures`` as (round, client, reason), never among
  the participants. Rounds are counted from 0 as in trainlab's driver (Flower's server round minus 1).

Client ``n`` is the ``n``-th smallest node id (node ``n + 1`` on LocalGrid, whose context's
``node_config["partition-id"]`` is ``n``); strategies send it as ``client-id`` in each train message's config.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from torch import Tensor

from trainlab.federated.aggregator import Aggregator, ClientUpdate
from trainlab.federated.simulate import ClientFailure, LocalTrainer

CLIENT_ERROR = 1  # the Error code of a client that failed during training


def to_vector(arrays: ArrayRecord) -> tuple[Tensor, dict[str, Tensor]]:
    """The flattened arrays (in the record's order) and the state-dict template to rebuild them."""
    state = arrays.to_torch_state_dict()
    return torch.cat([t.flatten().double() for t in state.values()]), state


def from_vector(vector: Tensor, template: dict[str, Tensor]) -> ArrayRecord:
    pieces = vector.split([t.numel() for t in template.values()])
    state = {k: p.view_as(t).to(t.dtype) for (k, t), p in zip(template.items(), pieces, strict=True)}
    return ArrayRecord(state)


class LocalGrid(Grid):
    """A Grid whose nodes are ``num_clients`` copies of one ClientApp called in this process."""

    def __init__(self, app: ClientApp, num_clients: int) -> None:
        self.app = app
        self.contexts = {
            n + 1: Context(run_id=1, node_id=n + 1, node_config={"partition-id": n}, state=RecordDict(), run_config={})
            for n in range(num_clients)
        }
        self._run = Run.create_empty(1)
        self._replies: dict[str, Message] = {}
        # Messages read the process's task identity; the ServerApp runs in this process (as Flower's own
        # in-process compat runner sets it).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's own grids assign it
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as error:  # noqa: BLE001  (any client error becomes an error reply, as on a SuperNode)
                reply = Message(Error(CLIENT_ERROR, f"{type(error).__name__}: {error}"), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def client_app(trainer: LocalTrainer) -> ClientApp:
    """A ClientApp training with ``trainer``; replies carry the trained arrays, ``num-examples`` and ``client-id``."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = message.content["config"]
        client = int(config["client-id"] if "client-id" in config else context.node_config["partition-id"])
        start, template = to_vector(message.content["arrays"])
        round = int(config["server-round"]) - 1  # Flower counts rounds from 1, trainlab from 0
        mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0  # sent by Flower's FedProx
        delta = trainer.update(client, round, start.to(trainer.params[0].dtype), mu).double()
        if not bool(torch.isfinite(delta).all()):
            raise ClientFailure(f"client {client} produced a non-finite update")
        metrics = MetricRecord({"num-examples": 1, "client-id": client})
        return Message(
            RecordDict({"arrays": from_vector(start + delta, template), "metrics": metrics}), reply_to=message
        )

    return app


class _Participation:
    """configure_train's node choice from a participation matrix [rounds, clients] (all nodes when None)."""

    participation: Tensor | None
    failures: list[tuple[int, int, str]]

    def _init_participation(self, participation: Tensor | None) -> None:
        self.participation, self.failures, self.current, self.clients = participation, [], None, {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))  # the strategy's own config
        # Client n is the n-th smallest node id (node n + 1 on LocalGrid; a SuperLink's ids are random); each
        # message says which client the node plays, so data and participation follow the client, not the node.
        self.clients = {node: n for n, node in enumerate(sorted(grid.get_node_ids()))}
        row = None if self.participation is None else self.participation[(server_round - 1) % len(self.participation)]
        kept = []
        for m in messages:
            client = self.clients[m.metadata.dst_node_id]
            if row is None or bool(row[client]):
                content = RecordDict(dict(m.content.items()))
                content["config"] = ConfigRecord({**m.content["config"], "client-id": client})
                kept.append(Message(content, m.metadata.dst_node_id, m.metadata.message_type))
        return kept

    def _record_failures(self, server_round: int, replies: list[Message]) -> list[Message]:
        valid = []
        for reply in replies:
            if reply.has_error():
                client = self.clients[reply.metadata.src_node_id]
                self.failures.append((server_round - 1, client, reply.error.reason))
            else:
                valid.append(reply)
        return valid


def with_participation(strategy_cls: type, participation: Tensor | None = None, **kwargs: Any) -> Any:
    """An instance of Flower strategy ``strategy_cls`` whose rounds sample clients from ``participation``."""

    class Participating(_Participation, strategy_cls):
        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            return super().aggregate_train(server_round, self._record_failures(server_round, list(replies)))

    Participating.__name__ = f"{strategy_cls.__name__}WithParticipation"
    strategy = Participating(**{"min_train_nodes": 1, "min_available_nodes": 1, "fraction_evaluate": 0.0, **kwargs})
    strategy._init_participation(participation)
    return strategy


class TrainlabStrategy(_Participation, FedAvg):
    """A Flower strategy whose aggregation is a pure trainlab Aggregator (fedau, fedstale, fedavg, ...)."""

    def __init__(self, aggregator: Aggregator, participation: Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**{"min_train_nodes": 1, "min_available_nodes": 1, "fraction_evaluate": 0.0, **kwargs})
        self.aggregator = aggregator
        self._init_participation(participation)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = self._record_failures(server_round, replies)
        x, template = to_vector(self.current)
        updates = []
        for reply in valid:
            returned, _ = to_vector(reply.content["arrays"])
            metrics = reply.content["metrics"]
            updates.append(ClientUpdate(int(metrics["client-id"]), returned - x, float(metrics["num-examples"])))
        updates.sort(key=lambda u: u.client)  # Flower samples nodes in random order; sums in client order
        step = self.aggregator.aggregate(updates).double()
        metrics = MetricRecord({"participants": len(updates), "failed": len(replies) - len(valid)})
        return from_vector(x + step, template), metrics
