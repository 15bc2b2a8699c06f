"""Exact optimizer-state accounting: the bytes an optimizer keeps between steps."""

from __future__ import annotations

import torch

from trainlab.optim.sharding import dtensor_class


def _local(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) state tensor, whose own data_ptr is always 0; else the tensor."""
    dtensor = dtensor_class()
    return value.to_local() if dtensor is not None and isinstance(value, dtensor) else value


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` (moments, projectors, counters), counted once each; under
    FSDP2 the bytes this rank holds (its shards)."""
    seen: set[int] = set()
    total = 0

    def visit(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            value = _local(value)
            ptr = value.data_ptr()
            if ptr not in seen:  # tensors sharing storage (views) are counted once
                seen.add(ptr)
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)

    for per_param in optimizer.state.values():
        visit(per_param)
    return total
