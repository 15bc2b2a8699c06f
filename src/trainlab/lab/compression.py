"""Workload glue for compression: the trained dense model a run starts from (cached), calibration data drawn
from a workload, and retraining on a workload. The methods themselves (:mod:`trainlab.compress`) take a model,
the user's batches and a loss callable; this module supplies those from a built-in workload."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress import recover
from trainlab.lab.workloads.base import Workload
from trainlab.runtime import atomic_path, batch_generator

CALIBRATION_SEED = 999_983  # far from training seeds, so calibration batches are not training batches


def trained_model(
    workload: Workload, seed: int = 0, steps: int | None = None, cache_dir: Path | None = None, progress: bool = False
) -> nn.Module:
    """The workload's model trained with AdamW at its tuned hyperparameters; with ``cache_dir``, the weights
    are reused from ``{workload}-seed{seed}-steps{steps}-{key}.pt`` when present (saved there atomically
    otherwise), where ``key`` hashes everything that changes the weights: the optimizer and its hyperparameters,
    the batch size and the model's parameter names, shapes and dtypes. An unreadable cache file is named in a
    warning, retrained and replaced."""
    from trainlab.lab.hyperparameters import resolve_hyperparameters
    from trainlab.lab.runner import train
    from trainlab.optim import create

    steps = workload.steps if steps is None else steps
    hp = resolve_hyperparameters("adamw", workload, None)
    path = None if cache_dir is None else Path(cache_dir) / cache_name(workload, seed, steps, hp)
    if path is not None and path.exists():
        torch.manual_seed(seed)
        model = workload.make_model()
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model
        except Exception as err:  # truncated or corrupt: RuntimeError, EOFError, UnpicklingError, ...
            warnings.warn(
                f"cached dense model {path} cannot be read ({type(err).__name__}); retraining it and replacing "
                "the file",
                stacklevel=2,
            )
    bar = tqdm(total=steps, desc=f"train {workload.name}", disable=not progress, leave=False)
    result = train(
        workload, lambda m: create("adamw", m.named_parameters(), **hp), seed=seed, steps=steps, progress=bar.update
    )
    bar.close()
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(result.model.state_dict(), tmp)
    return result.model


def cache_name(workload: Workload, seed: int, steps: int, hyperparameters: dict[str, Any]) -> str:
    """The cache file name of a dense training run: readable fields, then a hash of everything else that changes
    the trained weights."""
    torch.manual_seed(seed)
    shapes = [(k, list(v.shape), str(v.dtype)) for k, v in workload.make_model().state_dict().items()]
    content = {"optimizer": "adamw", "hyperparameters": hyperparameters, "batch_size": workload.batch_size,
               "model": shapes}  # fmt: skip
    key = hashlib.sha256(json.dumps(content, sort_keys=True, default=repr).encode()).hexdigest()[:12]
    return f"{workload.name}-seed{seed}-steps{steps}-{key}.pt"


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
