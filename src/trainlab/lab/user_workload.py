"""A workload from the user's own code, for ``trainlab bench --model pkg.module:factory --data pkg.module:batches``.

``--data`` names either ``make_batch(batch_size, generator) -> batch`` (drawn from the generator only, as the
built-in workloads do) or a list of batches / a zero-argument callable returning one. A list is split: its last
fifth (at least one batch) is held out for evaluation and training draws from the rest; a ``make_batch`` gets
evaluation batches from a seed no training step uses. The metric is the mean loss on the evaluation batches
(lower is better); there is no target unless ``target`` is given. The loss is ``--loss pkg.module:fn``
(``fn(model, batch) -> scalar``), else the output's own ``.loss`` (a Hugging Face model given labels), else
cross-entropy for ``(inputs, integer targets)`` and mean squared error for ``(inputs, float targets)``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainlab.compress.batches import run_batch
from trainlab.lab.user_models import is_hf_directory, load_model, load_object
from trainlab.lab.workloads.base import _WORKLOADS, Batch, Workload
from trainlab.runtime import batch_generator, evaluating

EVAL_SEED = 999_979  # far from training seeds: evaluation batches are not training batches
EVAL_BATCHES = 4


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The output's ``.loss``; else cross-entropy (integer targets) or MSE (float targets) of ``(inputs, targets)``."""
    out = run_batch(model, batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if not (isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(out, torch.Tensor)):
        raise ValueError(
            "no loss for this batch: give --loss pkg.module:fn (fn(model, batch) -> scalar), batches of "
            "(inputs, targets), or a model whose output carries .loss"
        )
    target = batch[1]
    if not target.is_floating_point():
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    return nn.functional.mse_loss(out, target)


def _make_batch(
    data: Any, spec: str, batch_size: int
) -> tuple[Callable[[int, torch.Generator], Batch], list[Batch], int | None]:
    """``(make_batch, evaluation batches, the batch size of a fixed list or None)`` for the ``--data`` object."""
    if callable(data) and len(inspect.signature(data).parameters) == 2:
        evaluation = [data(batch_size, batch_generator(EVAL_SEED, i)) for i in range(EVAL_BATCHES)]
        return data, evaluation, None
    batches = data() if callable(data) else data
    try:
        batches = list(batches)
    except TypeError:
        raise ValueError(
            f"--data {spec!r} must name make_batch(batch_size, generator), a list of batches or a callable returning "
            f"one; got {type(batches).__name__}"
        ) from None
    if len(batches) < 2:
        raise ValueError(f"--data {spec!r} gave {len(batches)} batch(es); at least 2 (training and evaluation)")
    held = max(1, len(batches) // 5)
    train, evaluation = batches[:-held], batches[-held:]

    def make_batch(batch_size: int, generator: torch.Generator) -> Batch:
        return train[int(torch.randint(len(train), (1,), generator=generator))]

    first = train[0][0] if isinstance(train[0], tuple | list) else train[0]
    size = first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else None
    return make_batch, evaluation, size


def user_workload(
    model: str,
    data: str,
    *,
    loss: str | None = None,
    steps: int = 200,
    batch_size: int = 32,
    target: float | None = None,
) -> Workload:
    """The workload named by the user's ``--model`` (a factory, or a local Hugging Face directory loaded fresh for
    every run), ``--data`` (and ``--loss``) specs; its name is the factory's (or the directory's)."""
    factory = (lambda: load_model(model).model) if is_hf_directory(model) else load_object(model, "--model")
    if not callable(factory):
        raise ValueError(f"--model {model!r} names a {type(factory).__name__}, not a callable returning an nn.Module")
    loss_fn = default_loss if loss is None else load_object(loss, "--loss")
    make_batch, evaluation, fixed = _make_batch(load_object(data, "--data"), data, batch_size)

    def make_model() -> nn.Module:
        built = factory()
        if not isinstance(built, nn.Module):
            raise ValueError(f"--model {model!r} returned a {type(built).__name__}, not a torch.nn.Module")
        return built

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        with evaluating(m):
            return sum(float(loss_fn(m, b)) for b in evaluation) / len(evaluation)

    return Workload(
        name=Path(model).name if is_hf_directory(model) else model.rpartition(":")[2],
        description=f"the user's {model} on {data}",
        make_model=make_model,
        make_batch=make_batch,
        loss=loss_fn,
        evaluate=evaluate,
        metric="evaluation loss",
        higher_is_better=False,
        target=-math.inf if target is None else target,
        steps=steps,
        batch_size=fixed or batch_size,
        eval_every=max(1, steps // 10),
    )


_USER_NAMES: set[str] = set()


def register_user_workload(workload: Workload) -> str:
    """Make ``workload`` reachable by name (replacing an earlier user workload of that name); returns the name."""
    if workload.name in _WORKLOADS and workload.name not in _USER_NAMES:
        raise ValueError(f"--model {workload.name!r} has the name of a built-in workload; rename the factory")
    _USER_NAMES.add(workload.name)
    _WORKLOADS[workload.name] = lambda: workload
    return workload.name
