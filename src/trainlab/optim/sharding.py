"""FSDP2 (DTensor) support shared by the optimizer shell and transforms, without importing
torch.distributed.tensor unless a process group is up (DTensors cannot exist before that).

Transforms that need whole matrices (projections, eigenbases, Newton-Schulz) gather each one explicitly, once per
step (`gather_whole`, `gather_stacked`), compute on every rank, and slice their result back (`reshard`, no
collective). Transforms whose math is a sum over entries (dot products, norms, Gram matrices) instead keep this
rank's shard and sum partial results across ranks (`all_reduce_sum`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def dtensor_class() -> type | None:
    """torch's DTensor class when torch.distributed is initialized, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.tensor import DTensor

        return DTensor
    return None


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, gradient or state tensor)."""
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; a plain tensor itself."""
    return t.to_local() if is_sharded(t) else t


def like(shard: Tensor, ref: Tensor) -> Tensor:
    """``shard`` (this rank's part of a tensor laid out as ``ref``) as a DTensor like ``ref``; a plain ``ref``
    returns ``shard`` itself. No collective."""
    if not is_sharded(ref):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride())


def matrix_shape(t: Tensor) -> tuple[int, int]:
    """``(size(0), numel/size(0))``: the shape of ``t`` viewed as a matrix, read from the (global) shape."""
    return t.size(0), math.prod(t.shape[1:])


def gather_whole(tensors: list[Tensor]) -> tuple[list[Tensor], list[Any]]:
    """Each tensor whole (a DTensor gathered once, explicitly) and its layout (None for plain tensors) for
    `reshard`. Transforms that need whole matrices call this once per step instead of letting every DTensor op
    inside them gather again."""
    cls = dtensor_class()
    if cls is None:
        return tensors, [None] * len(tensors)
    layouts = [(t.device_mesh, t.placements) if isinstance(t, cls) else None for t in tensors]
    return [t.full_tensor() if isinstance(t, cls) else t for t in tensors], layouts


def gather_stacked(tensors: list[Tensor]) -> list[Tensor]:
    """Tensors of one shape and layout (a parameter and its gradient), each whole, in one all-gather: their
    shards are stacked along a new first dimension and gathered together. Plain tensors are returned as they
    are; layouts other than sharding by dimension or replication fall back to one gather each."""
    if not tensors or not is_sharded(tensors[0]):
        return tensors
    from torch.distributed.tensor import DTensor, Replicate, Shard

    ref = tensors[0]
    same = all(t.shape == ref.shape and t.placements == ref.placements for t in tensors)
    plain = all(type(p) in (Shard, Replicate) for p in ref.placements)
    if not (same and plain):
        return gather_whole(tensors)[0]
    placements = [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in ref.placements]
    stacked = torch.stack([t.to_local() for t in tensors])
    shape = (len(tensors), *ref.shape)
    stride = (ref.numel(), *torch.empty(ref.shape, device="meta").stride())
    whole = DTensor.from_local(stacked, ref.device_mesh, placements, shape=torch.Size(shape), stride=stride)
    return list(whole.full_tensor().unbind(0))


def stacked_zeros(n: int, ref: Tensor, dtype: torch.dtype) -> Tensor:
    """Zeros of shape ``(n, *ref.shape)`` laid out as ``n`` copies of ``ref`` (each rank holds its shard of every
    copy: a DTensor sharded one dimension further); plain zeros for a plain ``ref``."""
    shard = torch.zeros(n, *local(ref).shape, dtype=dtype, device=ref.device)
    if not is_sharded(ref):
        return shard
    from torch.distributed.tensor import DTensor, Shard

    placements = [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in ref.placements]
    shape = torch.Size((n, *ref.shape))
    stride = (ref.numel(), *torch.empty(ref.shape, device="meta").stride())
    return DTensor.from_local(shard, ref.device_mesh, placements, shape=shape, stride=stride)


def gather_rows_together(tensors: list[Tensor]) -> list[Tensor]:
    """Tensors with one number of rows and one row sharding (a layer's weight and bias), each whole, in one
    all-gather: each shard viewed as ``(rows, -1)``, concatenated along the columns and gathered together.
    Plain tensors are returned as they are; other layouts fall back to one gather each."""
    if not tensors or not is_sharded(tensors[0]):
        return tensors
    from torch.distributed.tensor import DTensor, Replicate, Shard

    ref = tensors[0]
    same = all(is_sharded(t) and t.size(0) == ref.size(0) and t.placements == ref.placements for t in tensors)
    rows_only = all(p == Shard(0) or isinstance(p, Replicate) for p in ref.placements)
    if not (same and rows_only):
        return gather_whole(tensors)[0]
    shards = [t.to_local().reshape(t.to_local().size(0), -1) for t in tensors]
    widths = [matrix_shape(t)[1] for t in tensors]
    cols = sum(widths)
    joined = DTensor.from_local(
        torch.cat(shards, 1), ref.device_mesh, ref.placements, shape=torch.Size((ref.size(0), cols)), stride=(cols, 1)
    )
    parts = joined.full_tensor().split(widths, 1)
    return [p.reshape(t.shape) for p, t in zip(parts, tensors, strict=True)]


def all_reduce_mean_over_mesh(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (a plain tensor each rank computed from its own data) averaged, in place, over every rank of
    ``ref``'s device mesh (FSDP2 and HSDP ranks all see different batches); unchanged for a plain ``ref``."""
    if not is_sharded(ref):
        return t
    mesh = ref.device_mesh
    for dim in range(mesh.ndim):
        torch.distributed.all_reduce(t, group=mesh.get_group(dim))
    return t.div_(mesh.size())


def reshard(whole: Tensor, layout: Any) -> Tensor:
    """``whole`` (identical on every rank) back to a DTensor with ``layout``, by slicing locally (no collective)."""
    if layout is None:
        return whole
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = layout
    return distribute_tensor(whole, mesh, placements, src_data_rank=None)


def local_rows(t: Tensor) -> tuple[int, int] | None:
    """``(first, stop)``: the rows (dimension 0) of ``t`` this rank holds when ``t`` is a DTensor sharded along
    dimension 0 only (FSDP2's layout, even or not); None for other layouts and plain tensors."""
    if not is_sharded(t):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(p == Shard(0) or isinstance(p, Replicate) for p in t.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0]


def layout_of(t: Tensor) -> Any:
    """``t``'s layout for `reshard` (None for a plain tensor)."""
    return (t.device_mesh, t.placements) if is_sharded(t) else None


def all_reduce_sum(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (a plain tensor of partial sums over this rank's shard of ``ref``) summed over the ranks that
    shard ``ref``, in place, with one all-reduce; unchanged when ``ref`` is not sharded."""
    if not is_sharded(ref):
        return t
    from torch.distributed.tensor import Shard

    mesh = ref.device_mesh
    for dim, placement in enumerate(ref.placements):
        if isinstance(placement, Shard):
            torch.distributed.all_reduce(t, group=mesh.get_group(dim))
        elif not placement.is_replicate():
            raise ValueError(f"all_reduce_sum needs a sharded or replicated layout, got {ref.placements}")
    return t


def reduce_partials(partials: list[Tensor], refs: list[Tensor], op: str = "sum") -> list[Tensor]:
    """Per-tensor results over this rank's shards (0-dim, one per tensor of ``refs``) combined over the ranks
    that shard each tensor (``op`` "sum" or "max"), with one all-reduce per layout instead of one per tensor;
    the results of plain tensors are returned unchanged."""
    dtensor = dtensor_class()
    if dtensor is None:
        return partials
    groups: dict[tuple, list[int]] = {}
    for i, ref in enumerate(refs):
        if isinstance(ref, dtensor):
            groups.setdefault((ref.device_mesh, tuple(ref.placements)), []).append(i)
    if not groups:
        return partials
    from torch.distributed.tensor import Shard

    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    out = list(partials)
    for (mesh, placements), idx in groups.items():
        stacked = torch.stack([partials[i] for i in idx])
        for dim, placement in enumerate(placements):
            if isinstance(placement, Shard):
                torch.distributed.all_reduce(stacked, op=reduce_op, group=mesh.get_group(dim))
            elif not placement.is_replicate():
                raise ValueError(f"reduce_partials needs a sharded or replicated layout, got {placements}")
        for i, value in zip(idx, stacked.unbind(), strict=True):
            out[i] = value
    return out


def local_shards(tensors: list[Tensor]) -> list[Tensor]:
    """This rank's shard of each tensor; the list itself when no process group is up (the one-process path
    pays one check, not one per tensor)."""
    return tensors if dtensor_class() is None else [local(t) for t in tensors]


def like_each(shards: list[Tensor], refs: list[Tensor]) -> list[Tensor]:
    """`like` over lists: each shard as a DTensor laid out as its ref; ``shards`` itself without a process group."""
    return shards if dtensor_class() is None else [like(s, r) for s, r in zip(shards, refs, strict=True)]
