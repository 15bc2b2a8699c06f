"""S2FT: structured sparse fine-tuning of a few whole rows (output channels) or columns (input channels).

"Select sparsely, compute densely" (Yang et al., NeurIPS 2024; author code ``S2Linear``/``S2Linear2``): a random set
of k = max(1, round(ratio·n)) channels per layer (S2FT-R) gets a trainable dense block, zero at init —
rows: ``y[..., idx] += x s2ᵀ`` with s2 (k x in); columns: ``y += x[..., idx] s2ᵀ`` with s2 (out x k) — and merging
adds s2 into those rows/columns of W, which is the paper's in-place update of the submatrix. Everything else stays
frozen, so only the selected slices need activation gradients. :func:`co_permute_` is the paper's co-permutation:
it reorders a producer's rows and its consumer's columns together (the network function is unchanged) so that
selected channels become one contiguous block. ratio 0.013 is the authors' LLaMA-7B FFN setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

S2FT_PAPER = "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity (Yang et al., 2024)"


def selected_count(n: int, ratio: float) -> int:
    return max(1, min(n, round(ratio * n)))


class S2FTLayer(AdapterLayer):
    def __init__(self, base: nn.Module, *, ratio: float, side: str) -> None:
        super().__init__(base)
        self.side = side
        n = self.out_features if side == "rows" else self.in_features
        k = selected_count(n, ratio)
        index = torch.randperm(n)[:k].sort().values.to(self.base_weight().device)
        self.register_buffer("index", index)
        w = self.base_weight()
        shape = (k, self.in_features) if side == "rows" else (self.out_features, k)
        self.s2 = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(weight)
        return delta.index_copy(0 if self.side == "rows" else 1, self.index, self.s2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        if self.side == "rows":  # add the k selected outputs in place of a full-width zero-padded delta
            return y.index_add(-1, self.index, F.linear(x, self.s2))
        return y + F.linear(x.index_select(-1, self.index), self.s2)


@torch.no_grad()
def co_permute_(producer: nn.Linear, consumer: nn.Linear, order: torch.Tensor) -> None:
    """Reorder ``producer``'s output rows (and bias) and ``consumer``'s input columns by ``order``, in place.

    For ``consumer(act(producer(x)))`` with an elementwise ``act`` the function is unchanged; choose ``order``
    with the selected channels first to make them one contiguous block.
    """
    n = producer.out_features
    if consumer.in_features != n:
        raise ValueError(f"producer has {n} outputs but consumer takes {consumer.in_features} inputs")
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    producer.weight.copy_(producer.weight[order])
    if producer.bias is not None:
        producer.bias.copy_(producer.bias[order])
    consumer.weight.copy_(consumer.weight[:, order])


def selected_first(index: torch.Tensor, n: int) -> torch.Tensor:
    """A permutation of range(n) that lists ``index`` first (in order), then the rest (in order)."""
    rest = torch.ones(n, dtype=torch.bool)
    rest[index] = False
    return torch.cat([index.cpu(), torch.arange(n)[rest]])


def s2ft_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    out_features, in_features = weight.shape
    if config["side"] == "rows":
        return selected_count(out_features, config["ratio"]) * in_features
    return selected_count(in_features, config["ratio"]) * out_features


register_adapter(
    AdapterSpec(
        name="s2ft",
        paper=S2FT_PAPER,
        summary="trains a random few whole rows or columns of W as a dense block (zero at init), merged in place",
        fields={"ratio": Field(0.013, 0.0, 1.0), "side": Field("rows", choices=("rows", "columns"))},
        layer_class=S2FTLayer,
        layer_types=("linear", "conv1d"),
        count=s2ft_count,
    )
)
