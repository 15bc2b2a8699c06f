"""S2FT: structured sparse fine-tuning of a few whole channels, co-permuted into one contiguous block.

"Select sparsely, compute densely" (Yang et al., NeurIPS 2024; author code ``S2Linear``/``S2Linear2``,
``convert_mlp_layer_to_s2``). Coupled structures are the unit: an FFN channel c is row c of ``up``/``gate`` and
column c of ``down``; an attention head h is rows h·d..(h+1)·d of q, k, v and the same columns of o. With
``couple="up,gate>down"`` (producers ``>`` consumers, ``:d`` for heads of width d, ``;`` between structures), every
module holding those children is one structure. Per role (the targeted producers' rows, the targeted consumers'
columns) ``int(ratio x units x structures)``-style random units are drawn from the pooled (structure, unit) set
(S2FT-R), then each structure is co-permuted to [only rows, rows ∩ columns, only columns, rest] — the producers' rows
and the consumers' columns get the same order, so the network function is unchanged — and each targeted layer trains
one contiguous dense block ``s2`` (zero at init): rows ``y[..., a:b] += x s2ᵀ``, columns
``y += x[..., a:b] s2ᵀ``. Merging adds ``s2`` into ``W[a:b]`` (or ``W[:, a:b]``): the paper's in-place update.
Targets outside any structure fall back to k = round(ratio·n) random rows (or columns, ``side``) of their own; a
Conv2d (groups 1) trains k whole output channels (rows) through a k-channel convolution.
ratio 0.013 is the authors' LLaMA-7B FFN setting (``u_ratio = d_ratio``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.adapters.layer import AdapterLayer, layer_type, permute_channels_, weight_matrix
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

S2FT_PAPER = "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity (Yang et al., 2024)"


def selected_count(n: int, ratio: float) -> int:
    return max(1, min(n, round(ratio * n)))


class S2FTLayer(AdapterLayer):
    """Trains ``s2`` on the rows/columns ``index``; a coupled layer's ``rows=[a, b]`` or ``columns=[a, b]`` block."""

    def __init__(
        self,
        base: nn.Module,
        *,
        ratio: float,
        side: str,
        couple: str = "",
        rows: Sequence[int] | None = None,
        columns: Sequence[int] | None = None,
    ) -> None:
        super().__init__(base)
        if self.kind == "conv2d" and (side == "columns" or base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError(
                "s2ft on a Conv2d trains whole output channels: side='rows', groups=1 and padding_mode='zeros' only"
            )
        device = self.base_weight().device
        if rows is not None or columns is not None:
            self.side = "rows" if rows is not None else "columns"
            start, stop = rows if rows is not None else columns
            index = torch.arange(start, stop, device=device)
            self.block: tuple[int, int] | None = (start, stop)
        else:
            self.side = side
            n = self.out_features if side == "rows" else self.in_features
            index = torch.randperm(n)[: selected_count(n, ratio)].sort().values.to(device)
            self.block = None
        self.register_buffer("index", index)
        w = self.base_weight()
        k = len(index)
        shape = (k, self.in_features) if self.side == "rows" else (self.out_features, k)
        self.s2 = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))

    def layer_kwargs(self) -> dict[str, Any]:
        return {} if self.block is None else {self.side: list(self.block)}

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(weight)
        return delta.index_copy(0 if self.side == "rows" else 1, self.index, self.s2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.s2.numel():
            return y
        if self.block is not None:  # compute densely on the contiguous block
            start, stop = self.block
            if self.side == "rows":
                return torch.cat([y[..., :start], y[..., start:stop] + F.linear(x, self.s2), y[..., stop:]], -1)
            return y + F.linear(x[..., start:stop], self.s2)
        if self.kind == "conv2d":  # the k selected output channels through a k-channel convolution
            conv = self.base
            s2 = self.s2.view(len(self.index), *conv.weight.shape[1:])
            return y.index_add(-3, self.index, F.conv2d(x, s2, None, conv.stride, conv.padding, conv.dilation))
        if self.side == "rows":  # add the k selected outputs in place of a full-width zero-padded delta
            return y.index_add(-1, self.index, F.linear(x, self.s2))
        return y + F.linear(x.index_select(-1, self.index), self.s2)


def _as_list(modules: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


@torch.no_grad()
def co_permute_(
    producers: nn.Module | Sequence[nn.Module], consumers: nn.Module | Sequence[nn.Module], order: torch.Tensor
) -> None:
    """Reorder the producers' output rows (and biases) and the consumers' input columns by ``order``, in place.

    For ``consumer(act(producer(x)))`` with an elementwise ``act`` (or attention heads permuted whole) the function
    is unchanged; choose ``order`` with the selected channels first to make them one contiguous block.
    """
    producers, consumers = _as_list(producers), _as_list(consumers)
    n = weight_matrix(producers[0]).shape[0]
    widths = {weight_matrix(p).shape[0] for p in producers} | {weight_matrix(c).shape[1] for c in consumers}
    if widths != {n}:
        raise ValueError(f"producers' outputs and consumers' inputs must all have one width; got {sorted(widths)}")
    if order.shape != (n,) or not torch.equal(order.sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    for p in producers:
        permute_channels_(p, "rows", order)
    for c in consumers:
        permute_channels_(c, "columns", order)


def selected_first(index: torch.Tensor, n: int) -> torch.Tensor:
    """A permutation of range(n) that lists ``index`` first (in order), then the rest (in order)."""
    rest = torch.ones(n, dtype=torch.bool)
    rest[index] = False
    return torch.cat([index.cpu(), torch.arange(n)[rest]])


def parse_couple(text: str) -> list[tuple[list[str], list[str], int]]:
    """``"q,k,v>o:64;up,gate>down"`` -> [(producers, consumers, unit width), ...]."""
    structures = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        body, _, unit = part.partition(":")
        producers, sep, consumers = body.partition(">")
        names = [[n.strip() for n in side.split(",") if n.strip()] for side in (producers, consumers)]
        if not sep or not all(names) or (unit and not unit.strip().isdigit()) or (unit and int(unit) < 1):
            raise ValueError(
                f"s2ft: couple={text!r}: write each structure as 'producer,...>consumer,...' with an optional ':width' "
                "for heads, structures separated by ';' (e.g. 'q,k,v>o:64;up,gate>down')"
            )
        structures.append((names[0], names[1], int(unit) if unit else 1))
    return structures


def _structures(model: nn.Module, text: str) -> list[tuple[list[str], list[str], int]]:
    """Every (producer names, consumer names, unit) whose children a module of ``model`` holds, full names."""
    found = []
    for producers, consumers, unit in parse_couple(text):
        hits = 0
        for prefix, parent in model.named_modules():
            children = dict(parent.named_modules())
            if all(n in children for n in producers + consumers):
                full = [f"{prefix}.{n}" if prefix else n for n in producers + consumers]
                if any(layer_type(model.get_submodule(n)) not in ("linear", "conv1d") for n in full):
                    raise TypeError(f"s2ft: couple structure {producers}>{consumers} under {prefix!r} must be Linear")
                found.append((full[: len(producers)], full[len(producers) :], unit))
                hits += 1
        if not hits:
            raise ValueError(f"s2ft: couple structure {','.join(producers)}>{','.join(consumers)} matches no module")
    return found


def _draw(units: list[int], ratio: float) -> list[torch.Tensor]:
    """Random units per structure, drawn from the pooled (structure, unit) set (the fork's selection)."""
    total = sum(units)
    if not total:
        return [torch.zeros(0, dtype=torch.long) for _ in units]
    picked = torch.randperm(total)[: selected_count(total, ratio)]
    offsets = torch.tensor([0, *units]).cumsum(0)
    return [
        picked[(picked >= lo) & (picked < hi)].sort().values - lo
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
    ]


def s2ft_arrange(
    model: nn.Module, names: list[str], config: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]:
    """Select coupled units, co-permute ``model``'s structures in place, give each targeted layer its block."""
    layers: dict[str, dict[str, Any]] = {n: {} for n in names}
    permutations: dict[str, dict[str, list[int]]] = {}
    if not config["couple"]:
        return layers, permutations
    targeted = set(names)
    structures = _structures(model, config["couple"])
    widths = []
    for producers, _, unit in structures:
        n = weight_matrix(model.get_submodule(producers[0])).shape[0]
        if n % unit:
            raise ValueError(f"s2ft: {producers[0]} has {n} outputs, not a multiple of the unit width {unit}")
        widths.append(n // unit)
    rows = _draw(
        [u if targeted & set(p) else 0 for (p, _, _), u in zip(structures, widths, strict=True)], config["ratio"]
    )
    cols = _draw(
        [u if targeted & set(c) else 0 for (_, c, _), u in zip(structures, widths, strict=True)], config["ratio"]
    )
    for (producers, consumers, unit), count, r, c in zip(structures, widths, rows, cols, strict=True):
        in_rows, in_cols = torch.zeros(count, dtype=torch.bool), torch.zeros(count, dtype=torch.bool)
        in_rows[r], in_cols[c] = True, True
        ranks = torch.stack([in_rows & ~in_cols, in_rows & in_cols, ~in_rows & in_cols]).int().argmax(0)
        ranks[~(in_rows | in_cols)] = 3  # [only rows, both, only columns, rest], each in index order
        unit_order = torch.sort(ranks * count + torch.arange(count)).indices
        order = (unit_order[:, None] * unit + torch.arange(unit)).flatten()
        co_permute_([model.get_submodule(n) for n in producers], [model.get_submodule(n) for n in consumers], order)
        only_rows = int((in_rows & ~in_cols).sum())
        blocks = {n: ("rows", [0, len(r) * unit]) for n in producers}
        blocks |= {n: ("columns", [only_rows * unit, (only_rows + len(c)) * unit]) for n in consumers}
        for n, (side, block) in blocks.items():
            if side in permutations.setdefault(n, {}):
                raise ValueError(f"s2ft: {n} is in two coupled structures on its {side}; name it in one only")
            permutations[n][side] = order.tolist()
            if n in targeted:
                if layers[n]:  # a layer between two structures (consumer of one, producer of the next)
                    raise ValueError(f"s2ft: {n} would train both its rows and its columns; target it in one role")
                layers[n] = {side: block}
    return layers, permutations


def s2ft_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    out_features, in_features = weight.shape
    if "rows" in config or "columns" in config:
        start, stop = config.get("rows") or config["columns"]
        return (stop - start) * (in_features if "rows" in config else out_features)
    if config["side"] == "rows":
        return selected_count(out_features, config["ratio"]) * in_features
    return selected_count(in_features, config["ratio"]) * out_features


register_adapter(
    AdapterSpec(
        name="s2ft",
        paper=S2FT_PAPER,
        summary="trains a few whole channels, co-permuted into one contiguous dense block (zero at init), in place",
        fields={
            "ratio": Field(0.013, 0.0, 1.0),
            "side": Field("rows", choices=("rows", "columns")),
            "couple": Field("", text=True),
        },
        layer_class=S2FTLayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=s2ft_count,
        arrange=s2ft_arrange,
    )
)
