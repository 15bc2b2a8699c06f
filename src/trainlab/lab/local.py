"""Local-training methods (trainlab.localtrain) as bench algorithms, next to the optimizers and `backprop`.

`backprop` is the workload's own model trained end to end with AdamW at the workload's tuned AdamW values:
the baseline that "Beyond Backpropagation" compares every backprop-free method with. A local method gets the
same model (its weights drawn from the same seed) and the same batches, split into ``(inputs, labels)``; on
a graph, ``inputs = (features, adjacency)`` and nodes outside the training split get label -100.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from trainlab import localtrain
from trainlab.lab.runner import Batch, BatchTrainer
from trainlab.lab.workloads.base import Workload
from trainlab.lab.workloads.sbm import Graph
from trainlab.memory.saved import SavedTensorMeter
from trainlab.optim import create, get_spec
from trainlab.optim.accounting import state_bytes
from trainlab.runtime import batch_generator

BACKPROP = "backprop"
_BACKPROP_OPTIMIZER = "adamw"


def is_local(algorithm: str) -> bool:
    return algorithm in localtrain.method_names()


def algorithm_spec(algorithm: str) -> Any:
    """The registry entry behind a bench algorithm name (its ``defaults`` list the accepted keywords)."""
    if is_local(algorithm):
        return localtrain.get_spec(algorithm)
    return get_spec(_BACKPROP_OPTIMIZER if algorithm == BACKPROP else algorithm)


def tuned_hyperparameters(algorithm: str, workload: Workload) -> Mapping[str, Any]:
    """The workload's tuned values for ``algorithm`` (``backprop`` reads AdamW's)."""
    return workload.hyperparameters.get(_BACKPROP_OPTIMIZER if algorithm == BACKPROP else algorithm, {})


def split_batch(batch: Batch) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a workload batch: an ``(x, y)`` pair, or a whole graph."""
    if isinstance(batch, Graph):
        labels = torch.full_like(batch.labels, -100)
        labels[batch.train_idx] = batch.labels[batch.train_idx]
        return (batch.features, batch.adjacency), labels
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"local training needs (inputs, labels) batches or a Graph, got {type(batch).__name__}")


def _logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


class WorkloadTrainer:
    """A localtrain trainer fed the runner's batches (the runner's ``BatchTrainer``)."""

    def __init__(self, trainer: localtrain.LocalTrainer, example: Batch) -> None:
        self.trainer = trainer
        trainer.prepare(split_batch(example)[0])
        self.predictor = trainer.predictor

    def train_step(self, batch: Batch) -> torch.Tensor:
        return self.trainer.step(*split_batch(batch))

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)


def batch_size(workload: Workload, algorithm: str) -> int:
    """The workload's batch size, or every training row for methods that fit the whole set per step."""
    return 1 << 62 if is_local(algorithm) and localtrain.get_spec(algorithm).full_batch else workload.batch_size


def default_steps(workload: Workload, algorithm: str, hp: Mapping[str, Any]) -> int:
    """The workload's step count, or the method's own (GBNN: one step per boosting stage)."""
    if is_local(algorithm) and localtrain.get_spec(algorithm).steps is not None:
        return localtrain.get_spec(algorithm).steps(hp)
    return workload.steps


def make_trainer(
    workload: Workload, algorithm: str, hp: Mapping[str, Any], seed: int
) -> Callable[[nn.Module], torch.optim.Optimizer | BatchTrainer]:
    """The runner's factory for ``algorithm``: an optimizer over the model, or a local trainer of it."""
    if not is_local(algorithm):
        name = _BACKPROP_OPTIMIZER if algorithm == BACKPROP else algorithm
        return lambda model: create(name, model.named_parameters(), **hp)

    def make(model: nn.Module) -> BatchTrainer:
        example = workload.make_batch(batch_size(workload, algorithm), batch_generator(seed, 0))
        if isinstance(example, Graph):  # every node's class is known to the graph (ForwardGNN's layers need not
            num_classes = int(example.labels.max()) + 1  # end C wide: its last layer can be an embedding)
        else:
            with torch.no_grad():
                num_classes = int(_logits(model, split_batch(example)[0]).shape[-1])
        own = {"seed": seed} if "seed" in localtrain.get_spec(algorithm).defaults else {}
        trainer = localtrain.create(algorithm, model, num_classes=num_classes, **{**own, **hp})
        return WorkloadTrainer(trainer, example)

    return make


def trainer_state_bytes(trainer: torch.optim.Optimizer | BatchTrainer) -> int:
    """Bytes an optimizer keeps between steps; for a local trainer, those of all its optimizers."""
    if isinstance(trainer, WorkloadTrainer):
        return sum(state_bytes(o) for o in trainer.trainer.optimizers)
    return state_bytes(trainer)


def activation_peak_bytes(workload: Workload, algorithm: str, hp: Mapping[str, Any], seed: int, batch: Batch) -> int:
    """Measured peak bytes of activations autograd holds during one training step of ``algorithm`` on ``batch``.

    Every tensor saved for backward is counted while it is alive (SavedTensorMeter), parameters excluded. The
    step runs on a freshly built model and trainer (the sizes do not depend on the weights), so a finished run
    is left as it is (and GBNN, whose units are all used, can still be measured).
    """
    torch.manual_seed(seed)
    model = workload.make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # construction warnings were shown when the run itself was built
        trainer = make_trainer(workload, algorithm, hp, seed)(model)
    local = isinstance(trainer, WorkloadTrainer)
    params = list(trainer.trainer.parameters()) if local else list(model.parameters())
    with SavedTensorMeter(exclude=params) as meter:
        if local:
            trainer.train_step(batch)
        else:
            workload.loss(model, batch).backward()
    return meter.peak_bytes
