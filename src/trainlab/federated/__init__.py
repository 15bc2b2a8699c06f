"""Federated learning: aggregation as pure code over client updates with tensor-only state, a registry of the
methods, participation patterns and data partitions for simulation, an in-process driver, and Flower wrappers
(`trainlab.federated.flower`, needs the `federated` extra).

Front door: ``create(name, num_clients=..., dim=...)`` builds a registered method with its paper defaults."""

from trainlab.federated import asynchronous, fedau, fedavg, fedstale, monna  # noqa: F401  (register the methods)
from trainlab.federated.aggregator import Aggregator, ClientUpdate
from trainlab.federated.registry import FederatedSpec, create, get_spec, strategy_names

__all__ = ["Aggregator", "ClientUpdate", "FederatedSpec", "create", "get_spec", "strategy_names"]
