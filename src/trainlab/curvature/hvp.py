"""Hessian-vector products from a zero-argument loss function, by double backward.

``loss_fn`` is any callable returning a scalar loss (e.g. ``lambda: F.cross_entropy(model(x), y)``);
the gradient graph is built here, so callers never need ``loss.backward(create_graph=True)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[], Tensor]


def twice_differentiable() -> contextlib.AbstractContextManager:
    """Run a forward pass whose gradient will be differentiated again.

    The fused attention kernels of ``F.scaled_dot_product_attention`` (flash, memory-efficient) have no
    double backward; this selects the math kernel, which does, for the duration of the block.
    """
    return sdpa_kernel([SDPBackend.MATH])


def gradients_with_graph(loss_fn: LossFn, params: Sequence[Tensor]) -> list[Tensor]:
    """``∇loss`` w.r.t. ``params`` with its graph kept, so it can be differentiated again.

    Parameters the loss does not reach get zero gradients (with no graph).
    """
    with torch.enable_grad(), twice_differentiable():
        loss = loss_fn()
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def hvp_from_gradients(
    grads: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor], retain_graph: bool = True
) -> list[Tensor]:
    """``H v`` given gradients that carry their graph; keep the graph to reuse it for more products."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if live:
        products = torch.autograd.grad(
            [grads[i] for i in live],
            [params[i] for i in live],
            grad_outputs=[vectors[i] for i in live],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        for i, hv in zip(live, products, strict=True):
            if hv is not None:
                out[i] = hv
    return out


def hvp(loss_fn: LossFn, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """The Hessian of ``loss_fn()`` w.r.t. ``params`` times ``vectors`` (one tensor per parameter).

    Costs one forward, one backward and one backward of the backward (typically 2-3x a gradient).
    """
    params = list(params)
    if len(vectors) != len(params):
        raise ValueError(f"vectors must have one tensor per parameter: got {len(vectors)} for {len(params)}")
    for p, v in zip(params, vectors, strict=True):
        if v.shape != p.shape:
            raise ValueError(f"vector of shape {tuple(v.shape)} does not match parameter shape {tuple(p.shape)}")
    grads = gradients_with_graph(loss_fn, params)
    return [h.detach() for h in hvp_from_gradients(grads, params, vectors, retain_graph=False)]


def rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """Independent ±1 entries, each with probability ½, shaped like ``tensors``.

    Drawn as ``2·randint(0, 2) − 1``; ``randint(0, 1)`` is always 0 and gives the all −1 probe of a buggy
    AdaHessian port. One draw serves all tensors of a (device, dtype), split in order.
    """
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    for (device, dtype), idx in by_kind.items():
        sizes = [tensors[i].numel() for i in idx]
        flat = torch.randint(0, 2, (sum(sizes),), generator=generator, device=device, dtype=dtype).mul_(2).sub_(1)
        for i, chunk in zip(idx, flat.split(sizes), strict=True):
            out[i] = chunk.view(tensors[i].shape)
    return out
