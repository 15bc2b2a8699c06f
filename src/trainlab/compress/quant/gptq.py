"""Second-order error compensation (GPTQ: "Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), generic over the grid, and the calibration Hessians it needs.

For a linear layer ``y = x W^T`` with calibration inputs ``X`` (n x cols), the layer-wise loss
``||X W^T - X Q^T||^2`` has Hessian ``H = 2 X^T X`` (here ``2 X^T X / n``; the scale does not matter).
Columns are quantized left to right; after column ``j`` the rounding error is spread over the columns not yet
quantized, ``W[:, j+1:] -= (w_j - q_j) / U[j, j] * U[j, j+1:]``, where ``U`` is the upper Cholesky factor of
``(H + damp * mean(diag H) * I)^-1``. Updates inside a block of ``block_size`` columns are immediate, those to
later columns are applied once per block (lazy batch updates), as in the reference implementation
(``IST-DASLab/gptq``, ``gptq.py``: ``fasterquant``, ``percdamp=0.01``, ``blocksize=128``). Columns that never
see a non-zero input (``H[j, j] = 0``) are set to 0 and get ``H[j, j] = 1``, as there.

Groups (``grid.group_size``): a group's scales are fitted when its first column is reached, on ``W`` as the
reference does (``static_groups=False``: ``find_params(W[:, j:j + groupsize])``), i.e. with the lazy updates of
earlier blocks but not the ones made so far inside the current block. Fitting on the exactly updated block
columns instead gave a higher calibration loss in 7 of 9 measured settings (pylm 4 of 4, MiniLM 3 of 4, not
digits-mlp; numbers in docs/compression.md), so the reference's choice is followed. ``act_order`` is not
implemented.

A grid is any object with ``group_size`` (None or int), ``fit(slab) -> params`` (``slab``: the ``(rows, k)``
columns of one group, or the whole weight when ``group_size`` is None) and ``quantize_column(column, params)
-> grid values`` (``column``: ``(rows, 1)``), e.g. :class:`..grids.UniformGrid`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.compress.batches import run_batch
from trainlab.compress.quant.grids import GridParams, QuantizedWeight, UniformGrid, check_weight
from trainlab.layer_weights import is_transposed_linear, weight_matrix
from trainlab.runtime import evaluating

DAMP = 0.01  # fraction of the mean Hessian diagonal added to the diagonal (reference: percdamp=.01)
BLOCK_SIZE = 128  # columns per lazy-update block (reference: blocksize=128)


class ColumnGrid(Protocol):
    group_size: int | None

    def fit(self, weight: torch.Tensor) -> Any: ...

    def quantize_column(self, column: torch.Tensor, params: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class GPTQResult:
    """``weight``: the quantized (grid-valued) weight; ``params``: one entry per group in column order (a single
    entry without groups); ``column_loss``: for each column ``sum_rows (w - q)^2 / U[j, j]^2 / 2``, the
    loss increase GPTQ attributes to it (BAQ's per-column sensitivity)."""

    weight: torch.Tensor
    params: list[Any]
    column_loss: torch.Tensor


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (``U^T U`` = that inverse), float64."""
    h = hessian.double()
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(f"the damped Hessian is not positive definite; raise damp (got {damp})")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: ColumnGrid,
    *,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> GPTQResult:
    """Quantize ``weight`` (``(rows, cols)``) column by column onto ``grid`` with error compensation under the
    calibration Hessian ``hessian`` (``(cols, cols)``, e.g. from :func:`collect_hessians`). Works in the
    weight's dtype (float32 at least); the input tensors are not modified."""
    check_weight(weight)
    rows, cols = weight.shape
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (cols, cols):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be a ({cols}, {cols}) tensor for a weight with {cols} columns, got {got}")
    if not (isinstance(damp, int | float) and damp > 0):
        raise ValueError(f"damp must be > 0 (a fraction of the mean Hessian diagonal), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    group = grid.group_size

    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = damped_inverse_cholesky(h, damp).to(dtype)

    q = torch.zeros_like(w)
    losses = torch.zeros(cols, dtype=dtype)
    params: list[Any] = [] if group is not None else [grid.fit(w)]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if group is not None and (i1 + i) % group == 0:
                params.append(grid.fit(w[:, i1 + i : i1 + i + group]))  # reference: W, not the block's W1
            col = w1[:, i : i + 1]
            qcol = grid.quantize_column(col, params[-1])
            d = u1[i, i]
            q[:, i1 + i : i1 + i + 1] = qcol
            losses[i1 + i] = (col - qcol).square().sum() / d**2 / 2
            err = (col - qcol) / d
            w1[:, i:] -= err * u1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return GPTQResult(q.to(weight.dtype), params, losses)


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: UniformGrid,
    *,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> QuantizedWeight:
    """:func:`gptq` on a :class:`UniformGrid`, returned as codes + scales (dequantizes to ``gptq(...).weight``)."""
    result = gptq(weight, hessian, grid, damp=damp, block_size=block_size)
    return grid.encode(result.weight, GridParams.cat(result.params))


HESSIAN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X`` that ``module``'s weight, flattened to ``(out, -1)``, multiplies: a Linear's inputs (every
    leading dimension a sample), a convolution's input patches (one row per output position, ``F.unfold`` order).
    The input is padded as the convolution's own forward pads it (its ``padding_mode``: zeros, reflect,
    replicate or circular; numeric or ``"same"`` padding), so border patches hold what the layer really sees."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return x.reshape(-1, x.shape[-1])
    if module.groups != 1:
        raise ValueError(f"{type(module).__name__} needs groups=1 for a calibration Hessian, got {module.groups}")
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)  # torch's own (left, right) per dimension
    if isinstance(module, nn.Conv1d):  # as a Conv2d with a kernel of width 1
        x = x.unsqueeze(-1)
        kernel, dilation, stride = (module.kernel_size[0], 1), (module.dilation[0], 1), (module.stride[0], 1)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = F.unfold(x, kernel, dilation, 0, stride)  # (batch, in * kernel area, positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def collect_hessians(
    model: nn.Module, inputs: Sequence[Any], layers: Mapping[str, nn.Module] | None = None
) -> dict[str, torch.Tensor]:
    """``H = 2 X^T X / n`` (float64) of the inputs ``X`` (:func:`layer_input_rows`) reaching each Linear, Hugging
    Face Conv1D or convolution (all of ``model``'s Linear and Conv1D layers by default, or those in ``layers``)
    while the model runs on ``inputs`` (batches as :func:`~trainlab.compress.batches.run_batch` takes them), all in
    one pass."""
    if layers is None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_transposed_linear(m)}
    return _hessians(model, inputs, layers)


def quantize_sequentially(
    model: nn.Module,
    inputs: Sequence[Any],
    layers: Mapping[str, nn.Module],
    quantize: Callable[[str, torch.Tensor], None],
) -> dict[str, torch.Tensor]:
    """The reference's sequential calibration: ``layers`` in the order the forward pass first reaches them; each
    one's Hessian is collected on the inputs that the already-quantized earlier layers produce, then
    ``quantize(name, hessian)`` replaces that layer's weight in place before the next layer is measured.
    Returns the Hessians used. (:func:`collect_hessians` instead measures every layer on the dense model.) The
    forward pass stops at the layer under study when it runs once per pass; a shared layer is measured over
    whole passes, so every call counts."""
    calls = _call_counts(model, inputs[0], layers) if inputs else {}
    unseen = [name for name in layers if name not in calls]
    if unseen:
        raise ValueError(f"no calibration input reached layers {unseen}; check that they are used in forward")
    used = {}
    for name in calls:  # first-call order
        used[name] = _hessians(model, inputs, {name: layers[name]}, stop=calls[name] == 1)[name]
        quantize(name, used[name])
    return used


class _Reached(Exception):
    """Raised by the pre-hook of the layer under study: the rest of the forward pass is not needed."""


def _call_counts(model: nn.Module, batch: Any, layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """How often each layer runs in one forward pass on ``batch``, in the order of their first call."""
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            counts[name] = counts.get(name, 0) + 1

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    try:
        with evaluating(model), torch.no_grad():
            run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _hessians(
    model: nn.Module, inputs: Sequence[Any], layers: Mapping[str, nn.Module], stop: bool = False
) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` per layer over ``inputs``; ``stop``: end each pass at the (single) layer's input."""
    for name, module in layers.items():
        if not (isinstance(module, HESSIAN_LAYERS) or is_transposed_linear(module)):
            raise ValueError(
                f"layers[{name!r}] must be an nn.Linear, Conv1d, Conv2d or Hugging Face Conv1D, got "
                f"{type(module).__name__}"
            )
    widths = {name: weight_matrix(m).shape[1] for name, m in layers.items()}
    sums = {name: torch.zeros(n, n, dtype=torch.float64) for name, n in widths.items()}
    counts = dict.fromkeys(layers, 0)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = layer_input_rows(module, args[0].detach()).double()
            sums[name] += x.T @ x
            counts[name] += x.shape[0]
            if stop:
                raise _Reached

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    try:
        with evaluating(model), torch.no_grad():
            for x in inputs:
                with contextlib.suppress(_Reached):
                    run_batch(model, x)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name, n in counts.items() if n == 0]
    if unseen:
        raise ValueError(f"no calibration input reached layers {unseen}; check that they are used in forward")
    return {name: 2 * sums[name] / counts[name] for name in layers}
