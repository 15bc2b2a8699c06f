"""Compressors that prune one layer: unstructured magnitude and N:M; the gradual (cubic) pruning schedule.

Counts are exact: pruning ``n`` weights at sparsity ``s`` removes exactly ``round(s * n)`` of them (ties in
magnitude are broken by ``torch.topk``), so allocators can hit a global budget to the weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainlab.compress.masks import apply_mask
from trainlab.compress.plan import compressible_layers
from trainlab.compress.registry import parse_pattern, register_compressor

MAGNITUDE_PAPER = "Learning both Weights and Connections for Efficient Neural Networks (Han et al., NeurIPS 2015)"
NM_PAPER = "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch (Zhou et al., ICLR 2021)"


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def kept_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights survive pruning at ``sparsity`` (exactly ``numel - round(s * numel)``);
    a single layer may be pruned entirely (``sparsity == 1``), a whole model may not (:func:`check_sparsity`)."""
    if not isinstance(sparsity, int | float) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"a layer's sparsity must be a number in [0, 1], got {sparsity!r}")
    return numel - round(sparsity * numel)


def magnitude_mask(weight: torch.Tensor, kept: int) -> torch.Tensor:
    """Boolean mask keeping the ``kept`` largest-magnitude entries of ``weight``."""
    if not 0 <= kept <= weight.numel():
        raise ValueError(f"kept must be in [0, {weight.numel()}], got {kept}")
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[torch.topk(weight.detach().abs().flatten(), kept, sorted=False).indices] = True
    return mask.view_as(weight)


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """View with the input dimension last: (out, in) stays, conv (out, in, *k) -> (out, *k, in)."""
    return weight if weight.dim() == 2 else weight.movedim(1, -1)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest-magnitude weights of every group of ``m`` consecutive inputs (input dim)."""
    parse_pattern(f"{n}:{m}")
    w = _input_last(weight.detach())
    if w.shape[-1] % m:
        raise ValueError(f"N:M pattern needs the input dimension ({w.shape[-1]}) divisible by M={m}")
    groups = w.abs().reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    mask = mask.reshape(w.shape)
    return mask if weight.dim() == 2 else mask.movedim(-1, 1)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs keeps exactly ``n``."""
    groups = _input_last(mask).reshape(-1, m)
    return bool((groups.sum(dim=1) == n).all())


@register_compressor(
    "magnitude",
    paper=MAGNITUDE_PAPER,
    summary="unstructured: the smallest-magnitude weights of the layer zeroed (masks survive training)",
    kind="mask",
    level="sparsity",
)
def magnitude(weight: torch.Tensor, *, sparsity: float) -> torch.Tensor:
    """Mask keeping all but exactly ``round(sparsity * numel)`` of ``weight``'s entries, largest magnitudes."""
    return magnitude_mask(weight, kept_count(weight.numel(), sparsity))


@register_compressor(
    "nm",
    paper=NM_PAPER,
    summary="N:M by magnitude: the N largest of every M consecutive inputs kept (input size a multiple of M)",
    kind="nm",
    level="pattern",
)
def nm(weight: torch.Tensor, *, pattern: str) -> torch.Tensor:
    """N:M mask of ``weight``, ``pattern`` like ``"2:4"``."""
    return nm_mask(weight, *parse_pattern(pattern))


def prune_magnitude(module: nn.Module, sparsity: float) -> None:
    """Unstructured magnitude pruning of one layer in place to ``sparsity`` (fraction of weights zeroed)."""
    apply_mask(module, magnitude(module.weight, sparsity=sparsity))


def prune_nm(module: nn.Module, pattern: str) -> None:
    """N:M pruning of one layer in place, ``pattern`` like ``"2:4"``."""
    n, m = parse_pattern(pattern)
    apply_mask(module, nm_mask(module.weight, n, m), pattern=f"{n}:{m}")


def cubic_sparsity(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, clamped to [t0, t1]."""
    if end <= begin:
        raise ValueError(f"end ({end}) must be after begin ({begin})")
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualMagnitudePruner:
    """Magnitude pruning during training on the cubic schedule, every ``frequency`` steps in [begin, end].

    Call :meth:`step` after each optimizer step; it has a scheduler's shape, so it can be passed to the
    runner as ``make_scheduler=lambda opt: pruner``. Pruned weights stay zero in between (masks).
    """

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float,
        begin: int,
        end: int,
        frequency: int = 10,
        layers: Iterable[str] | None = None,
        initial_sparsity: float = 0.0,
    ) -> None:
        check_sparsity(final_sparsity, "final_sparsity")
        if frequency <= 0:
            raise ValueError(f"frequency must be a positive integer, got {frequency}")
        cubic_sparsity(begin, final_sparsity, begin, end)  # validates begin < end
        all_layers = compressible_layers(model)
        names = list(all_layers) if layers is None else list(layers)
        unknown = [n for n in names if n not in all_layers]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; compressible layers are: {', '.join(all_layers)}")
        self.layers = {n: all_layers[n] for n in names}
        self.final, self.begin, self.end, self.frequency = final_sparsity, begin, end, frequency
        self.initial = initial_sparsity
        self.count = 0

    def step(self) -> None:
        self.count += 1
        t = self.count
        if self.begin <= t <= self.end and ((t - self.begin) % self.frequency == 0 or t == self.end):
            s = cubic_sparsity(t, self.final, self.begin, self.end, self.initial)
            for module in self.layers.values():
                prune_magnitude(module, s)


class MagnitudeLevels:
    """Level database for magnitude pruning: each layer's weights sorted once, so the pruned weight at any
    kept count is one scatter (masks are nested: keeping k+1 keeps the same k and one more)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.dense = {k: w.detach().clone() for k, w in weights.items()}
        self.order = {k: w.abs().flatten().argsort(descending=True) for k, w in self.dense.items()}

    def weight(self, name: str, kept: int) -> torch.Tensor:
        w = self.dense[name].flatten().clone()
        w[self.order[name][kept:]] = 0
        return w.view_as(self.dense[name])
