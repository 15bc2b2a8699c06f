"""FSDP2 (DTensor) support shared by the optimizer shell and transforms, without importing
torch.distributed.tensor unless a process group is up (DTensors cannot exist before that)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def dtensor_class() -> type | None:
    """torch's DTensor class when torch.distributed is initialized, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.tensor import DTensor

        return DTensor
    return None


def gather_whole(tensors: list[Tensor]) -> tuple[list[Tensor], list[Any]]:
    """Each tensor whole (a DTensor gathered once, explicitly) and its layout (None for plain tensors) for
    `reshard`. Transforms that need whole matrices call this once per step instead of letting every DTensor op
    inside them gather again."""
    cls = dtensor_class()
    if cls is None:
        return tensors, [None] * len(tensors)
    layouts = [(t.device_mesh, t.placements) if isinstance(t, cls) else None for t in tensors]
    return [t.full_tensor() if isinstance(t, cls) else t for t in tensors], layouts


def reshard(whole: Tensor, layout: Any) -> Tensor:
    """``whole`` (identical on every rank) back to a DTensor with ``layout``, by slicing locally (no collective)."""
    if layout is None:
        return whole
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = layout
    return distribute_tensor(whole, mesh, placements, src_data_rank=None)
