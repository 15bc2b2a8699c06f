"""Count the bytes that autograd keeps alive for backward, the memory activation-saving methods cut.

Peak resident memory mixes activations with allocator caching, gradients and weights; the tensors that
autograd saves for backward are exactly what checkpointing and StreamBP trade for recomputation, so their
peak is the number to compare. Every saved tensor passes through `torch.autograd.graph.saved_tensors_hooks`
(custom `autograd.Function`s that call ``ctx.save_for_backward`` included); the meter wraps each one in a
holder whose release, when its graph node frees it, takes the bytes off the live total.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _Held:
    """A saved tensor whose lifetime the meter follows: the graph holds this object instead of the tensor."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int], meter: SavedTensorMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorMeter:
    """Peak and current bytes of tensors saved for backward while the ``with`` block is active.

    A tensor counts ``numel * element_size`` bytes; the same view saved by several ops (same data pointer and
    size) counts once while any of them holds it. Tensors sharing storage with ``exclude`` (pass the model's
    parameters: Linear saves its weight, which is not an activation) are not counted. Backward passes started
    inside the block, and graphs they build (recomputation), are metered too.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: dict[tuple[int, int], int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Held:
        if t.layout == torch.sparse_coo:  # no storage of its own: its values and indices count
            values, indices = t._values(), t._indices()
            key = (values.data_ptr(), values.nbytes + indices.nbytes)
        elif t.untyped_storage().data_ptr() in self._excluded:
            return t
        else:
            key = (t.data_ptr(), t.numel() * t.element_size())
        if key not in self._refs:
            self.live_bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] = self._refs.get(key, 0) + 1
        return _Held(t, key, self)

    @staticmethod
    def _unpack(packed: torch.Tensor | _Held) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, key: tuple[int, int]) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live_bytes -= key[1]
