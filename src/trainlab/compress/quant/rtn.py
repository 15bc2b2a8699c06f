"""The ``rtn`` quantizer: uniform round-to-nearest per output channel or group of inputs; with second order,
GPTQ's error compensation on the same grid."""

from __future__ import annotations

import torch

from trainlab.compress.quant.gptq import quantize_gptq
from trainlab.compress.quant.grids import QuantizedWeight, UniformGrid
from trainlab.compress.registry import Hyperparameter, register_compressor


@register_compressor(
    "rtn",
    paper="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers (second order); "
    "round-to-nearest otherwise",
    summary="uniform round-to-nearest per channel/group (GPTQ with second order)",
    kind="quantizer",
    level="bits",
    second_order="optional",
    grouped=True,
    hyperparameters={"symmetric": Hyperparameter(True, choices=(True, False))},
)
def rtn(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int | None = None,
    hessian: torch.Tensor | None = None,
    symmetric: bool = True,
) -> QuantizedWeight:
    grid = UniformGrid(bits, symmetric, group_size=group_size)
    return grid.quantize(weight) if hessian is None else quantize_gptq(weight, hessian, grid)
