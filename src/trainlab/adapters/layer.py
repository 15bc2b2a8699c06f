"""The adapter layer: a frozen base module plus a trainable delta, with exact merge and unmerge.

Every method writes its update as a weight delta ``ΔW`` in the (out, in) orientation of ``F.linear`` (a convolution
is viewed as out x in*kh*kw, transformers' ``Conv1D`` stores the transpose). Methods whose delta depends on the base
weight (HUT, Bone/Bat) receive it as an argument and say how to recover it from the merged weight.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.layer_weights import layer_type, weight_matrix  # noqa: F401  (the adapters import them from here)


@torch.no_grad()
def permute_channels_(module: nn.Module, side: str, order: torch.Tensor) -> None:
    """Reorder the output rows (``side="rows"``, with the bias) or input columns of a Linear/Conv1D, in place."""
    if layer_type(module) not in ("linear", "conv1d"):
        raise TypeError(
            f"only nn.Linear and transformers' Conv1D channels can be permuted, not {type(module).__name__}"
        )
    w = weight_matrix(module)
    if side == "rows":
        w.copy_(w[order])
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(module.bias[order])
    else:
        w.copy_(w[:, order])


def apply_permutations_(model: nn.Module, permutations: dict[str, dict[str, list[int]]]) -> None:
    """Repeat recorded channel permutations (``{module: {"rows"|"columns": order}}``) on ``model``, in place."""
    for name, sides in permutations.items():
        for side, order in sides.items():
            permute_channels_(model.get_submodule(name), side, torch.tensor(order))


def in_out(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = weight_matrix(module).shape
    return in_features, out_features


class AdapterLayer(nn.Module, ABC):
    """``y = base(x) + delta(x)``: ``base`` is frozen, the delta's tensors are the adapter's state.

    Subclasses implement :meth:`delta_weight` (and may override :meth:`delta_output` with a cheaper factored form).
    ``merge`` writes ``W + ΔW(W)`` into the base weight; ``unmerge`` writes back ``W`` exactly up to rounding.
    """

    weight_dependent = False  # True when ΔW is a function of the base weight (then override restore_weight)
    # True when ΔW is materialized anyway (Bone, HUT, SaRA, SNELL): the forward runs one op with W + ΔW instead of
    # the base op plus a second op with ΔW.
    fused_forward = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.kind = layer_type(base)
        self.in_features, self.out_features = in_out(base)
        self.merged = False

    # -- what a method defines ---------------------------------------------------------------------------------
    @abstractmethod
    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (out x in) given the unmerged base weight matrix ``weight``."""

    def restore_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """The unmerged weight from ``merged = W + ΔW(W)``; exact for weight-independent deltas."""
        return merged - self.delta_weight(merged)

    def layer_kwargs(self) -> dict[str, Any]:
        """Per-layer construction arguments decided by a plan (saved with the adapter); most methods have none."""
        return {}

    # -- shared machinery ----------------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        return weight_matrix(self.base)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` through the base layer's operation with an (out x in) ``weight`` (and ``bias``)."""
        if self.kind == "conv2d":
            conv = self.base
            if conv.padding_mode != "zeros":
                raise ValueError(f"adapters support Conv2d with padding_mode='zeros', not {conv.padding_mode!r}")
            w = weight.reshape(conv.weight.shape)
            return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.linear(x, weight, bias)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_weight(x, self.delta_weight(self.base_weight()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.fused_forward:
            w = self.base_weight()
            return self.apply_weight(x, w + self.delta_weight(w), getattr(self.base, "bias", None))
        return self.base(x) + self.delta_output(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base_weight()
        w.copy_(w + self.delta_weight(w))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_weight()
        w.copy_(self.restore_weight(w.clone()))
        self.merged = False

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        """A plain copy of the base module whose weight has the delta folded in (this layer is unchanged)."""
        plain = copy.deepcopy(self.base)
        w = weight_matrix(plain)
        if not self.merged:
            w.copy_(w + self.delta_weight(self.base_weight()))
        for p in plain.parameters():
            p.requires_grad_(True)
        return plain

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors (parameters and persistent buffers, the base excluded)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load this layer's adapter tensors; shapes may differ from the fresh layer's (pruned or planned sizes)."""
        own = self.adapter_state()
        missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
        if missing or unexpected:
            raise ValueError(
                f"adapter tensors do not match the layer: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        if self.merged:
            raise ValueError("unmerge the adapter before loading tensors into it")
        for name, value in tensors.items():
            module = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
            leaf = name.rpartition(".")[2]
            current = getattr(module, leaf)
            value = value.to(device=current.device, dtype=current.dtype)
            if current.shape == value.shape:
                current.copy_(value)
            elif isinstance(current, nn.Parameter):
                setattr(module, leaf, nn.Parameter(value.clone(), requires_grad=current.requires_grad))
            else:
                setattr(module, leaf, value.clone())
        self.loaded()

    def loaded(self) -> None:
        """Refresh host-side copies of loaded buffers (kept so that forward never syncs with the device)."""

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"
