"""Exact optimizer-state accounting: the bytes an optimizer keeps between steps."""

from __future__ import annotations

import torch


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` (moments, projectors, counters), counted once each."""
    seen: set[int] = set()
    total = 0

    def visit(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
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
