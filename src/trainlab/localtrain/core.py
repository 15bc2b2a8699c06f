"""What the local-training methods share: the trainer interface, blocks of a Sequential, detach boundaries.

A *detach boundary* sits before every block: the block sees its input detached, so its local loss reaches
only its own parameters, and that loss is backpropagated at once, so the block's saved activations are
freed before the next block runs. Activation memory is then one block's, not the whole network's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class LocalTrainer(ABC):
    """Trains a model without end-to-end backpropagation.

    ``step(inputs, labels)`` runs one update on one batch and returns the summed local losses (detached);
    ``predictor`` is the module that maps inputs to class scores after (or during) training. The caller's
    model is trained in place, as an optimizer trains it; what the method adds (projections, virtual nodes,
    denoising blocks) belongs to the trainer and is saved with it. Labels of -100 mark unlabelled rows
    (cross-entropy's ``ignore_index``), used by the graph methods for nodes outside the training set.
    """

    predictor: nn.Module
    # Step counters a resumed run needs (saved with the state, as is ``self.generator``'s state if it has one).
    _counters: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._optimizers: list[torch.optim.Optimizer] = []
        self._prepared = False

    @abstractmethod
    def _trained(self) -> nn.Module:
        """Every module whose parameters the method trains (the caller's model and its own additions)."""

    @abstractmethod
    def _prepare(self, inputs: Any) -> list[torch.optim.Optimizer]:
        """Build what needs the input shapes and return the optimizers (called once, before the first step)."""

    @abstractmethod
    def _step(self, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """One training update; returns the summed local losses, detached."""

    def prepare(self, inputs: Any) -> None:
        """Build the parts that depend on the input shapes (idempotent; ``step`` calls it)."""
        if not self._prepared:
            self._optimizers = self._prepare(inputs)
            self._prepared = True

    def step(self, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        self.prepare(inputs)
        return self._step(inputs, labels)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._optimizers)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._trained().parameters()

    def state_dict(self) -> dict[str, Any]:
        state = {
            "modules": self._trained().state_dict(),
            "optimizers": [o.state_dict() for o in self._optimizers],
            "counters": {name: getattr(self, name) for name in self._counters},
        }
        generator = getattr(self, "generator", None)
        if isinstance(generator, torch.Generator):
            state["generator"] = generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict``; call ``prepare`` first where the method builds lazily."""
        if not self._prepared:
            raise RuntimeError("call prepare(example_inputs) before load_state_dict: the trainer is not built yet")
        self._trained().load_state_dict(state["modules"])
        for optimizer, saved in zip(self._optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for name, value in state["counters"].items():
            setattr(self, name, value)
        if "generator" in state:
            self.generator.set_state(state["generator"])


class Residual(nn.Module):
    """``x + body(x)``: a residual block, trained as one unit (its input is detached, its skip path too)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def as_sequential(model: nn.Module) -> nn.Sequential:
    """``model`` itself if it is an ``nn.Sequential``, else the equivalent one its ``as_sequential()`` returns
    (over the model's own modules, so training it trains the model)."""
    if isinstance(model, nn.Sequential):
        return model
    if callable(getattr(model, "as_sequential", None)):
        view = model.as_sequential()
        if isinstance(view, nn.Sequential):
            return view
    raise TypeError(
        f"model must be an nn.Sequential of layers (or offer as_sequential() returning one, with Residual for skip "
        f"connections), got {type(model).__name__}"
    )


def split_blocks(model: nn.Module) -> list[nn.Sequential]:
    """Cut ``model`` (see ``as_sequential``) into blocks that each start at a layer with parameters.

    Parameter-free layers (activations, flatten, pooling) join the block before them; leading ones join the
    first block. A block is the unit a local loss trains.
    """
    model = as_sequential(model)
    blocks: list[list[nn.Module]] = []
    leading: list[nn.Module] = []
    for layer in model:
        has_params = any(True for _ in layer.parameters())
        if has_params:
            blocks.append([*leading, layer])
            leading = []
        elif blocks:
            blocks[-1].append(layer)
        else:
            leading.append(layer)
    if not blocks:
        raise ValueError("model has no layer with parameters to train")
    blocks[-1].extend(leading)
    return [nn.Sequential(*layers) for layers in blocks]


def train_blocks_locally(
    blocks: Sequence[nn.Module], x: Any, local_loss: Callable[[int, Any], torch.Tensor]
) -> tuple[torch.Tensor, Any]:
    """Run ``blocks`` in order with a detach boundary before each; backpropagate each local loss at once.

    ``local_loss(i, h)`` scores block ``i``'s output. Returns the summed local losses (detached) and the last
    block's output (detached).
    """
    total = torch.zeros(())
    for i, block in enumerate(blocks):
        h = block(_detach(x))
        loss = local_loss(i, h)
        loss.backward()  # frees this block's graph before the next block runs
        total = total + loss.detach()
        x = _detach(h)
    return total, x


def _detach(x: Any) -> Any:
    return tuple(t.detach() for t in x) if isinstance(x, tuple) else x.detach()
