"""Peak bytes of the tensors that operations create, measured on any device (CPU included).

``torch.cuda.max_memory_allocated`` exists only on GPUs and peak RSS mixes in the allocator's caching, so
this meter follows tensors themselves: every operation run while it is active passes through a
``TorchDispatchMode``; an output that does not share storage with the operation's inputs is a new allocation,
counted (once per storage) until the last tensor object viewing it is garbage-collected.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMeter(TorchDispatchMode):
    """``with PeakTensorMeter() as meter: ...``; then ``meter.peak_bytes``, ``meter.largest`` (shape and bytes),
    ``meter.bytes_by_op`` (bytes each operation allocated in all).

    Tensors alive before the block (parameters, inputs) are not counted; ``largest_shapes`` keeps the shape of
    every allocation of at least ``record_at_least`` bytes, to check what a step materializes.
    """

    def __init__(self, record_at_least: int = 0) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest: tuple[tuple[int, ...], int] = ((), 0)
        self.record_at_least = record_at_least
        self.shapes: list[tuple[int, ...]] = []
        self.bytes_by_op: dict[str, int] = {}  # bytes allocated by each operation (e.g. "randn.default")
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [tensor objects alive, bytes]

    def __torch_dispatch__(self, func: Any, types: Any, args: Iterable = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and _storage(t) not in inputs:
                self._track(t, str(func.__name__))
        return out

    def _track(self, t: torch.Tensor, op: str) -> None:
        ptr, nbytes = _storage(t), t.untyped_storage().nbytes()
        if ptr not in self._refs:
            self.bytes_by_op[op] = self.bytes_by_op.get(op, 0) + nbytes
            self._refs[ptr] = [0, nbytes]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            if nbytes > self.largest[1]:
                self.largest = (tuple(t.shape), nbytes)
            if nbytes >= self.record_at_least:
                self.shapes.append(tuple(t.shape))
        self._refs[ptr][0] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if not entry[0]:
            del self._refs[ptr]
            self.live_bytes -= entry[1]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.layout == torch.strided else id(t)
