"""Kronecker-factored curvature with rank-1 updates (MKOR): Sherman-Morrison and the layer observer.

MKOR approximates a layer's curvature by ``R ⊗ L`` with ``L`` built from the layer's inputs and ``R``
from the gradients at its outputs, and keeps the *inverses* current by rank-1 Sherman-Morrison updates
with the batch-mean vectors, so no matrix is ever inverted.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainlab.layer_weights import is_transposed_linear


def sherman_morrison(inverse: Tensor, v: Tensor) -> Tensor:
    """``(P⁻¹ + vvᵀ)⁻¹`` from ``P = inverse``: ``P − (Pv)(vᵀP)/(1 + vᵀPv)`` (mkor/utils/factors.py)."""
    pv = inverse @ v
    vp = v @ inverse
    return inverse - torch.outer(pv, vp) / (1 + vp @ v)


@dataclass
class LayerStatistics:
    """The rank-1 vectors of one layer's last training forward/backward and its bias (if any)."""

    bias: Tensor | None
    inputs: Tensor | None = None  # ā: batch-mean input (spatial mean for conv), with a 1 for the bias
    output_grads: Tensor | None = None  # ḡ: batch-mean of n·∂loss/∂output, n = rows (undoes mean losses)
    # ḡ before the clamp and the largest |entry| it clamped: an optimizer that learns at step time that the
    # gradients were scaled (GradScaler) unscales ḡ exactly whenever the clamp did not cut the unscaled rows.
    output_grads_unclamped: Tensor | None = None
    output_grads_peak: Tensor | None = None
    transposed: bool = False  # the weight is stored (in, out): a Hugging Face Conv1D


class LayerObserver:
    """Records ā and ḡ for every ``nn.Linear``, Hugging Face ``Conv1D`` (GPT-2's linear layer, weight stored
    ``(in, out)``) and ``nn.Conv2d`` (groups=1) whose weight is watched.

    An optimizer sees only parameters (``create("mkor", model.named_parameters())``), not modules, so
    the observer installs one *global* module forward hook (``register_module_forward_hook``) that ignores
    every module but those layers; the output-gradient is caught by a hook on the layer's output. Only
    forwards with grad enabled are recorded (evaluation under ``no_grad`` is not). Hooks are removed by
    `remove` or when the observer is garbage-collected. With several forwards per step (gradient
    accumulation) the last one's statistics are used.
    """

    def __init__(self, clipping: float = 100.0) -> None:
        self.watched: set[int] = set()
        self.clipping = clipping
        self.layers: dict[int, LayerStatistics] = {}  # keyed by id(weight)
        self.bias_of: dict[int, int] = {}  # id(bias) -> id(weight)
        self_ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            observer = self_ref()
            if observer is not None:
                observer._record(module, args, output)

        self._handle = nn.modules.module.register_module_forward_hook(hook)
        weakref.finalize(self, self._handle.remove)

    def watch(self, params: Iterable[Tensor]) -> None:
        """Record the layers whose weight is one of ``params``."""
        self.watched.update(id(p) for p in params)

    def remove(self) -> None:
        """Remove the global hook now (it also goes when the observer is garbage-collected)."""
        self._handle.remove()

    def _record(self, module: nn.Module, args: tuple, output: object) -> None:
        transposed = is_transposed_linear(module)
        if not (isinstance(module, nn.Linear) or transposed or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            return
        if id(module.weight) not in self.watched or not torch.is_grad_enabled():
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        stats = self.layers.get(id(module.weight))
        if stats is None:
            stats = self.layers[id(module.weight)] = LayerStatistics(bias=module.bias, transposed=transposed)
            if module.bias is not None:
                self.bias_of[id(module.bias)] = id(module.weight)
        x = args[0].detach()
        if isinstance(module, nn.Conv2d):
            patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            rows = patches.mean(-1)  # (N, C·kh·kw): spatial mean, as ComputeI.conv2d
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.clamp(-self.clipping, self.clipping)
        if module.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
        stats.inputs = rows.mean(0)
        clip = self.clipping

        def grad_hook(grad: Tensor) -> None:
            g = grad.detach()
            g = g.flatten(2).mean(-1) if isinstance(module, nn.Conv2d) else g.reshape(-1, g.shape[-1])
            rows = g * g.shape[0]
            stats.output_grads = rows.clamp(-clip, clip).mean(0)
            stats.output_grads_unclamped, stats.output_grads_peak = rows.mean(0), rows.abs().amax()

        output.register_hook(grad_hook)
