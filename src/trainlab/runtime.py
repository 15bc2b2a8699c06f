"""How a model is run: the ground floor every other module may import (and which imports nothing of trainlab).

- :func:`evaluating`: eval mode under ``torch.no_grad()`` that restores *each* submodule's own training flag on
  exit (a wrapped model may mix modes: a frozen backbone in eval mode under a head in train mode).
- :func:`batch_generator`: the seeded generator that draws the batch of one step of one run.
- :func:`atomic_path`: every file trainlab writes appears whole or not at all (temporary file, then rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` under ``torch.no_grad()``; on exit every submodule gets back its own previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator that draws the batch of ``step`` in the run with ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds, removed when it
    raises, so a reader never sees a half-written file (the parent folder is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
