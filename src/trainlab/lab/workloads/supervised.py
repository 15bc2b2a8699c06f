"""Pieces the classification workloads share: row sampling, evaluation mode and accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.runtime import evaluating


def sample_rows(
    tensors: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """The same ``batch_size`` distinct random rows of each tensor; all rows, in order, when it asks for
    at least as many as there are (full-batch training)."""
    n = tensors[0].shape[0]
    if batch_size >= n:
        return tensors
    index = torch.randperm(n, generator=generator)[:batch_size]
    return tuple(t[index] for t in tensors)


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of ``model(inputs)`` for an ``(inputs, labels)`` batch."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def accuracy_evaluator(
    data: Callable[[], tuple[Any, torch.Tensor]],
    logits: Callable[[nn.Module, Any], torch.Tensor] = lambda model, inputs: model(inputs),
) -> Callable[[nn.Module], float]:
    """``evaluate(model)``: accuracy of ``logits(model, inputs)`` on ``data() = (inputs, labels)``.

    ``data`` is a callable so that building a workload does not load its data.
    """

    def evaluate(model: nn.Module) -> float:
        inputs, labels = data()
        with evaluating(model):
            return accuracy(logits(model, inputs), labels)

    return evaluate
