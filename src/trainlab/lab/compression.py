"""Workload glue for compression: the trained dense model a run starts from (cached), calibration data drawn
from a workload, and retraining on a workload. The methods themselves (:mod:`trainlab.compress`) take a model,
the user's batches and a loss callable; this module supplies those from a built-in workload."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress import recover
from trainlab.lab.workloads.base import Workload
from trainlab.runtime import batch_generator

CALIBRATION_SEED = 999_983  # far from training seeds, so calibration batches are not training batches


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/trainlab`` (or ``~/.cache/trainlab``): where dense checkpoints are reused from."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainlab"


def trained_model(
    workload: Workload, seed: int = 0, steps: int | None = None, cache_dir: Path | None = None, progress: bool = False
) -> nn.Module:
    """The workload's model trained with AdamW at its tuned hyperparameters; with ``cache_dir``, the weights
    are reused from ``{workload}-seed{seed}-steps{steps}.pt`` when present (saved there otherwise). A cached
    file that no longer fits the workload's model (its architecture changed) is retrained and replaced."""
    from trainlab.lab.hyperparameters import resolve_hyperparameters
    from trainlab.lab.runner import train
    from trainlab.optim import create

    steps = workload.steps if steps is None else steps
    path = None if cache_dir is None else Path(cache_dir) / f"{workload.name}-seed{seed}-steps{steps}.pt"
    if path is not None and path.exists():
        torch.manual_seed(seed)
        model = workload.make_model()
        with contextlib.suppress(RuntimeError, KeyError, EOFError):  # a stale or truncated entry is retrained
            model.load_state_dict(torch.load(path, weights_only=True))
            return model
    hp = resolve_hyperparameters("adamw", workload, None)
    bar = tqdm(total=steps, desc=f"train {workload.name}", disable=not progress, leave=False)
    result = train(
        workload, lambda m: create("adamw", m.named_parameters(), **hp), seed=seed, steps=steps, progress=bar.update
    )
    bar.close()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(result.model.state_dict(), tmp)
        os.replace(tmp, path)
    return result.model


def calibration_batches(workload: Workload, batches: int = 4, batch_size: int | None = None) -> list[Any]:
    """Whole training batches (inputs and targets) drawn with a seed no training run uses."""
    size = batch_size or workload.batch_size
    return [workload.make_batch(size, batch_generator(CALIBRATION_SEED, i)) for i in range(batches)]


def calibration_inputs(workload: Workload, batches: int = 4, batch_size: int | None = None) -> list[torch.Tensor]:
    """The model inputs of :func:`calibration_batches` (same draws)."""
    return [batch[0] for batch in calibration_batches(workload, batches, batch_size)]


def training_batches(workload: Workload, steps: int, seed: int = 0) -> Iterator[Any]:
    """``steps`` training batches of the workload's batch size, drawn lazily (step ``i`` from ``(seed, i)``)."""
    return (workload.make_batch(workload.batch_size, batch_generator(seed, step)) for step in range(steps))


def retrain(
    model: nn.Module,
    workload: Workload,
    params: Iterable[nn.Parameter],
    steps: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> None:
    """:func:`trainlab.compress.recover.retrain` on ``steps`` of the workload's batches with its loss."""
    batches = tqdm(
        training_batches(workload, steps, seed), total=steps, desc="retrain", disable=not progress, leave=False
    )
    recover.retrain(model, batches, workload.loss, params, lr)


def recover_perp(
    model: nn.Module,
    workload: Workload,
    steps: int = 150,
    lr: float = 1e-3,
    rank: int = 4,
    seed: int = 1,
    progress: bool = False,
) -> float:
    """:func:`trainlab.compress.recover.recover_perp` on ``steps`` of the workload's batches with its loss."""
    batches = tqdm(training_batches(workload, steps, seed), total=steps, desc="PERP", disable=not progress, leave=False)
    return recover.recover_perp(model, batches, workload.loss, lr=lr, rank=rank)
