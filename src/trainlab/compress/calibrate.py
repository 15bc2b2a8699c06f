"""Calibration data and per-layer measurements taken through forward hooks, one layer at a time.

A forward hook on the layer under study replaces its output by the output it would give with a candidate
weight, so the model itself is never edited. Measuring one layer at a time is what the additivity
hypothesis of layer-adaptive pruning needs: each distortion curve is taken with every other layer dense.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.compress.batches import OutputFn, output_of
from trainlab.compress.plan import compressible_layers
from trainlab.layer_weights import is_transposed_linear, to_out_major
from trainlab.runtime import evaluating


def model_outputs(
    model: nn.Module, inputs: Sequence[torch.Tensor], output_fn: OutputFn | None = None
) -> list[torch.Tensor]:
    with evaluating(model):
        return [output_of(model, x, output_fn) for x in inputs]


@contextmanager
def substituted_weight(module: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module`` computes its output with ``weight`` (via a forward hook)."""

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if isinstance(mod, nn.Linear) or is_transposed_linear(mod):  # ``weight`` in the module's own layout
            return F.linear(args[0], to_out_major(mod, weight), mod.bias)
        return mod._conv_forward(args[0], weight, mod.bias)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def kl_to_dense(dense: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_dense || p) for logits whose last dimension is the class/vocabulary."""
    p = F.log_softmax(dense.reshape(-1, dense.shape[-1]).double(), dim=-1)
    q = F.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean")


def staged_kl_fitness(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    weight_at: Callable[[str, Any], torch.Tensor],
    output_fn: OutputFn | None = None,
) -> Callable[[Mapping[str, Any], int, int], float]:
    """EvoPress's fitness: the mean KL to ``model``'s outputs of a copy whose layers carry
    ``weight_at(name, level)`` for a child's ``{name: level}``. Stage 0 scores every child on one calibration
    batch (another one each generation), later stages on all of them (fresh data per stage, the same for all
    children). ``output_fn``: the user's ``output_fn(model, batch) -> tensor`` (default
    :func:`~.batches.output_of`)."""
    work = copy.deepcopy(model)
    layers = compressible_layers(work)
    dense = model_outputs(model, calibration, output_fn)

    def fitness(levels: Mapping[str, Any], stage: int, generation: int) -> float:
        with torch.no_grad():
            for name, level in levels.items():
                layers[name].weight.copy_(weight_at(name, level))
        picked = [generation % len(calibration)] if stage == 0 else range(len(calibration))
        with evaluating(work):
            return sum(kl_to_dense(dense[i], output_of(work, calibration[i], output_fn)).item() for i in picked) / len(
                picked
            )

    return fitness


def distortion_curves(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    levels: Mapping[str, Sequence[int]],
    weight_at: Callable[[str, int], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    progress: Callable[[int], None] | None = None,
    output_fn: OutputFn | None = None,
) -> dict[str, list[float]]:
    """Output distortion E||f(x) - f_l(x)||^2 (mean over outputs) when only layer ``l`` is compressed to
    each of its ``levels`` (``weight_at(name, level)`` gives the compressed weight); one layer at a time.
    ``output_fn``: as in :func:`staged_kl_fitness`."""
    dense = model_outputs(model, inputs, output_fn)
    curves: dict[str, list[float]] = {}
    with evaluating(model):
        for name, module in layers.items():
            curve = []
            for level in levels[name]:
                with substituted_weight(module, weight_at(name, level)):
                    pairs = zip(inputs, dense, strict=True)
                    err = sum(F.mse_loss(output_of(model, x, output_fn), d, reduction="sum").item() for x, d in pairs)
                curve.append(err / sum(d.numel() for d in dense))
            curves[name] = curve
            if progress is not None:
                progress(1)
    return curves
