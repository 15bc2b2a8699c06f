"""S2FT: structured sparse fine-tuning of a few whole channels, co-permuted into one contiguous block.

"Select sparsely, compute densely" (Yang et al., NeurIPS 2024; author code ``S2Linear``/``S2Linear2``,
``convert_mlp_layer_to_s2``). Coupled structures are the unit: an FFN channel c is row c of ``up``/``gate`` and
column c of ``down``; an attention head h is rows h·d..(h+1)·d of q, k, v and the same columns of o. With
``couple="up,gate>down"`` (producers ``>`` consumers, ``:d`` for heads of width d, ``;`` between structures), every
module holding those children is one structure. Per role (the targeted producers' rows, the targeted consumers'
columns) ``int(ratio x units x structures)``-style random units are drawn from the pooled (structure, unit) set
(S2FT-R, ``selection="random"``, the fork's default) or the top-k by a score (``selection=``, below), then each
structure is co-permuted to [only rows, rows ∩ columns, only columns, rest] — the producers' rows
and the consumers' columns get the same order, so the network function is unchanged — and each targeted layer trains
one contiguous dense block ``s2`` (zero at init): rows ``y[..., a:b] += x s2ᵀ``, columns
``y += x[..., a:b] s2ᵀ``. Merging adds ``s2`` into ``W[a:b]`` (or ``W[:, a:b]``): the paper's in-place update.
Targets outside any structure fall back to k = round(ratio·n) random rows (or columns, ``side``) of their own; a
Conv2d (groups 1) trains k whole output channels (rows) through a k-channel convolution.
ratio 0.013 is the authors' LLaMA-7B FFN setting (``u_ratio = d_ratio``).

Selection (the paper's ablation compares random with weight-, activation-, scaled- and gradient-based choices of the
largest or the smallest units): ``"<score>-large"`` / ``"<score>-small"`` take the k units with the largest /
smallest score, pooled over the structures like the random draw, where for unit u (a channel, or a head's d
channels) and a role's matrices (the producers for rows, the consumers for columns):

- ``weight``: Σ ‖W[u]‖²_F over the role's matrices (rows u of each producer, columns u of each consumer);
- ``activation``: the RMS of the unit's activation, the first consumer's input on the data,
  ``sqrt(mean over samples of Σ_{c∈u} x_c²)`` (one score for both roles);
- ``scaled``: ``sqrt(weight) x activation`` (the weight scaled by its input, Wanda-style);
- ``gradient``: Σ ‖Ḡ[u]‖²_F of the mean gradient Ḡ of the role's matrices over the data.

Activation, scaled and gradient scores read data at attach time: ``attach(model, "s2ft", ..., batches=..., loss=...)``
(the selection decides the structure, so it cannot wait for ``prepare``). Non-random selections need ``couple=``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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
        selection: str = "random",
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


SCORES = ("weight", "activation", "scaled", "gradient")
SELECTIONS = ("random", *(f"{score}-{end}" for score in SCORES for end in ("large", "small")))
Data = tuple[Iterable[Any], Callable[[nn.Module, Any], torch.Tensor]]


def _draw(units: list[int], ratio: float, scores: list[torch.Tensor] | None = None, largest: bool = True):
    """Units per structure from the pooled (structure, unit) set: at random (the fork's selection), or the top-k of
    ``scores`` (one tensor per structure; ties go to the lower pooled index)."""
    total = sum(units)
    if not total:
        return [torch.zeros(0, dtype=torch.long) for _ in units]
    k = selected_count(total, ratio)
    if scores is None:
        picked = torch.randperm(total)[:k]
    else:
        pooled = torch.cat([sc.double().cpu()[:n] for sc, n in zip(scores, units, strict=True)])
        picked = torch.sort(pooled, descending=largest, stable=True).indices[:k]
    offsets = torch.tensor([0, *units]).cumsum(0)
    return [
        picked[(picked >= lo) & (picked < hi)].sort().values - lo
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
    ]


def _unit_norms(matrix: torch.Tensor, unit: int) -> torch.Tensor:
    """Σ of squares over each unit's ``unit`` consecutive rows of ``matrix``."""
    return matrix.detach().double().pow(2).sum(1).view(-1, unit).sum(1)


def _data_scores(
    model: nn.Module, structures: list[tuple[list[str], list[str], int]], selection: str, data: Data | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per structure: activation RMS per unit, and the mean gradient's unit norms for rows and for columns."""
    if data is None:
        raise ValueError(
            f"s2ft: selection={selection!r} scores channels on data: pass batches= and loss= to attach "
            "(weight-* and random selections need none)"
        )
    batches, loss = data
    consumers = [model.get_submodule(c[0]) for _, c, _ in structures]
    squares: list[torch.Tensor | float] = [0.0] * len(structures)
    counts = [0] * len(structures)

    def hook(i: int) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            squares[i] = squares[i] + x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            counts[i] += x.reshape(-1, x.shape[-1]).shape[0]

        return record

    names = list(dict.fromkeys(n for p, c, _ in structures for n in p + c))
    modules = [model.get_submodule(n) for n in names]
    weights = [m.weight for m in modules]  # the leaves (a Conv1D's matrix is their transpose)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    sums = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(consumers)]
    seen = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            for s_, g in zip(sums, torch.autograd.grad(loss(model, batch), weights, allow_unused=True), strict=True):
                if g is not None:
                    s_.add_(g.double())
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if not seen or not all(counts):
        raise ValueError("s2ft: the selection data gave no batch (or never reached a coupled structure's consumer)")
    grads = {
        n: (s_.T if layer_type(m) == "conv1d" else s_) / seen for n, m, s_ in zip(names, modules, sums, strict=True)
    }
    activation, rows, cols = [], [], []
    for (producers, consumers_, unit), sq, n in zip(structures, squares, counts, strict=True):
        activation.append((sq / n).view(-1, unit).sum(1).sqrt())
        rows.append(sum(_unit_norms(grads[p], unit) for p in producers))
        cols.append(sum(_unit_norms(grads[c].T, unit) for c in consumers_))
    return activation, rows, cols


def _scores(
    model: nn.Module, structures: list[tuple[list[str], list[str], int]], selection: str, data: Data | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(row scores, column scores) per structure for ``selection``, or None for a random draw."""
    if selection == "random":
        return None
    score = selection.rpartition("-")[0]

    def weights(side: int) -> list[torch.Tensor]:
        out = []
        for structure in structures:
            mats = [weight_matrix(model.get_submodule(n)) for n in structure[side]]
            out.append(sum(_unit_norms(m if side == 0 else m.T, structure[2]) for m in mats))
        return out

    if score == "weight":
        return weights(0), weights(1)
    activation, grad_rows, grad_cols = _data_scores(model, structures, selection, data)
    if score == "activation":
        return activation, activation
    if score == "gradient":
        return grad_rows, grad_cols
    return (
        [w.sqrt() * a for w, a in zip(weights(0), activation, strict=True)],
        [w.sqrt() * a for w, a in zip(weights(1), activation, strict=True)],
    )


def s2ft_arrange(
    model: nn.Module, names: list[str], config: Mapping[str, Any], data: Data | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]:
    """Select coupled units (``config["selection"]``; ``data`` = (batches, loss) for the data-based scores),
    co-permute ``model``'s structures in place, give each targeted layer its block."""
    layers: dict[str, dict[str, Any]] = {n: {} for n in names}
    permutations: dict[str, dict[str, list[int]]] = {}
    if not config["couple"]:
        if config["selection"] != "random":
            raise ValueError(
                f"s2ft: selection={config['selection']!r} scores coupled units; name the structures with couple= "
                "(layers outside any structure draw their rows or columns at random)"
            )
        return layers, permutations
    targeted = set(names)
    structures = _structures(model, config["couple"])
    widths = []
    for producers, _, unit in structures:
        n = weight_matrix(model.get_submodule(producers[0])).shape[0]
        if n % unit:
            raise ValueError(f"s2ft: {producers[0]} has {n} outputs, not a multiple of the unit width {unit}")
        widths.append(n // unit)
    scores = _scores(model, structures, config["selection"], data)
    largest = config["selection"].endswith("-large")
    rows = _draw(
        [u if targeted & set(p) else 0 for (p, _, _), u in zip(structures, widths, strict=True)],
        config["ratio"],
        None if scores is None else scores[0],
        largest,
    )
    cols = _draw(
        [u if targeted & set(c) else 0 for (_, c, _), u in zip(structures, widths, strict=True)],
        config["ratio"],
        None if scores is None else scores[1],
        largest,
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
            "selection": Field("random", choices=SELECTIONS),
        },
        layer_class=S2FTLayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=s2ft_count,
        arrange=s2ft_arrange,
    )
)
