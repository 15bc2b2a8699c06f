"""trainlab optimizers in the Hugging Face ``Trainer``.

* ``Trainer(..., optimizer_cls_and_kwargs=trainer_optimizer("muon", lr=0.02))`` selects any registered optimizer
  by name (the ``optim="trainlab:<name>"`` of this integration): the Trainer calls the factory with its model and
  :func:`trainlab.optim.create_optimizer` builds the optimizer from module types (biases and norms out of weight
  decay, embeddings and the head on the AdamW chain of routed recipes). The Trainer's learning-rate schedule then
  scales every group from its own starting lr.
* :class:`GroupLearningRates`, a callback, logs every param group's real learning rate (``lr/<chain>-<i>``): the
  Trainer's own ``learning_rate`` is the first group's only, which for Muon says nothing about the AdamW chain.
* AdaHessian needs ``optimizer.step(closure)``: its step differentiates the gradient again (a Hessian-vector
  product), so it must run the forward and backward itself, which the Trainer's loop (backward in
  ``training_step``, then a bare ``optimizer.step()``) never lets it do. :class:`ClosureTrainer` runs the whole
  step inside ``training_step`` with a closure and makes the Trainer's later ``optimizer.step()`` a no-op; it needs
  ``gradient_accumulation_steps=1`` and does not clip gradients (``max_grad_norm`` would act after the step).

Needs ``transformers`` (the ``hf`` extra); importing this module imports it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from trainlab.optim import create_optimizer, get_spec


class _Factory:
    """What ``optimizer_cls_and_kwargs`` holds: calling it gives the builder the Trainer calls with its model."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> Any:
        def build(model: nn.Module, **hyperparameters: Any) -> torch.optim.Optimizer:
            return create_optimizer(model, self.name, **hyperparameters)

        return build


def trainer_optimizer(name: str, **hyperparameters: Any) -> tuple[Any, dict[str, Any]]:
    """The ``optimizer_cls_and_kwargs`` for ``Trainer`` that builds trainlab's optimizer ``name`` (checked now:
    an unknown name or hyperparameter raises ValueError before the Trainer starts)."""
    spec = get_spec(name)
    unknown = sorted(set(hyperparameters) - set(spec.defaults) - {"weight_decay", "head", "print_routing"})
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for {name!r}; allowed: {', '.join(sorted(spec.defaults))}"
        )
    return _Factory(name), dict(hyperparameters)


class GroupLearningRates(TrainerCallback):
    """Adds each param group's learning rate to the Trainer's logs as ``lr/<chain>-<index>``."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        if optimizer is None or logs is None:
            return
        rates = {f"lr/{g.get('chain', 'group')}-{i}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
        logs.update(rates)
        if state.log_history:
            state.log_history[-1].update(rates)


def _skip_next_bare_step(optimizer: torch.optim.Optimizer) -> None:
    """After a step the Trainer calls ``optimizer.step()`` once more: this instance's ``step`` then does nothing.
    A bound method, so torch's LR schedulers can wrap it as they wrap any optimizer's step."""
    real = type(optimizer).step
    optimizer._trainlab_stepped = False

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        if closure is None and self._trainlab_stepped:
            self._trainlab_stepped = False
            return None
        self._trainlab_stepped = closure is not None
        return real(self, closure)

    optimizer.step = types.MethodType(step, optimizer)


class ClosureTrainer(Trainer):
    """A ``Trainer`` whose optimizer steps with a closure (for AdaHessian; any optimizer works)."""

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        _skip_next_bare_step(optimizer)
        return optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("ClosureTrainer steps once per batch: set gradient_accumulation_steps=1")
        model.train()
        inputs = self._prepare_inputs(inputs)

        losses: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad()
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            loss.backward()
            losses.append(loss.detach())
            return loss

        self.optimizer.step(closure)  # accelerate's wrapper does not return the closure's loss
        if not losses:
            raise RuntimeError("the optimizer did not call its closure; ClosureTrainer needs one that does")
        return losses[-1]
