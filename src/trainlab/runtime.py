"""How a model is run: the ground floor every other module may import (and which imports nothing of trainlab).

- :func:`evaluating`: eval mode under ``torch.no_grad()`` that restores *each* submodule's own training flag on
  exit (a wrapped model may mix modes: a frozen backbone in eval mode under a head in train mode).
- :func:`batch_generator`: the seeded generator that draws the batch of one step of one run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
