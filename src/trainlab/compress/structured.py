"""Structured channel pruning that physically slices layers: Beta-Rank filter scores and PreCropping widths.

Why slice instead of mask: a zeroed channel still costs memory and FLOPs; removing it (a Conv2d's out-channels,
the following BatchNorm's entries and the next layer's in-channels, or a Linear's rows and the next layer's
columns; after ``Flatten`` each channel owns ``H·W`` consecutive features) gives a model that is smaller on disk
and faster on commodity hardware while computing exactly what the zero-channel model computes.

Sources. Beta-Rank ("Beta-Rank: A Robust Convolutional Filter Pruning Method For Imbalanced Medical Image
Analysis", code ``mohofar/Beta-Rank`` ``rank_generation.py::std_filters``): filter j scores
``mean(|W_j|) · Σ_p std_batch(O[:, j, p]) / std(I[patch p])`` over output positions p, with the patch taken as the
paper intends (``F.unfold`` with the layer's padding/stride; the official slice mixes up NCHW axes); positions with a
constant input patch are skipped (the official code skips the NaN they produce). A Linear unit is the 1×1 case.
PreCropping ("Structured Pruning is All You Need for Pruning CNNs at Initialization"; no official code): run
iterative SynFlow (100 rounds, exponential density schedule) to the target density, read the per-layer densities
d_l, and set channel ratios a_l = min(1, d_l / a_{l-1}) (a_0 = 1, so a_{l-1}·a_l ≈ d_l; a reconstruction, the
exact rule is unconfirmed); the SynFlow mask itself is discarded.

Supported models: ``nn.Sequential`` chains of Conv2d (groups=1), Linear, BatchNorm1d/2d, Flatten, pooling,
dropout and activations, e.g. the ``digits-cnn`` and ``digits-mlp`` workloads. Every Conv2d/Linear except the last
(the output layer) is prunable.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.compress.prune import check_sparsity
from trainlab.compress.registry import compressor_names, get_compressor, register_compressor
from trainlab.compress.storage import load, read_metadata, save

SYNFLOW_ROUNDS = 100  # SynFlow paper's default for iterative pruning
_METADATA_KEY = "trainlab.structured.architecture"


def _attrs(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda mod: {name: getattr(mod, name) for name in names}


def _conv_args(mod: nn.Conv2d) -> dict[str, Any]:
    if mod.groups != 1 or mod.padding_mode != "zeros":
        raise ValueError("structured pruning supports Conv2d with groups=1 and zero padding only")
    return {
        **_attrs("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")(mod),
        "bias": mod.bias is not None,
    }


_BATCHNORM = _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
# Constructor arguments of every supported module type, read back from the module (JSON in the file metadata).
_ARGS: dict[type[nn.Module], Callable[[nn.Module], dict[str, Any]]] = {
    nn.Conv2d: _conv_args,
    nn.Linear: lambda mod: {**_attrs("in_features", "out_features")(mod), "bias": mod.bias is not None},
    nn.BatchNorm1d: _BATCHNORM,
    nn.BatchNorm2d: _BATCHNORM,
    nn.Flatten: _attrs("start_dim", "end_dim"),
    nn.MaxPool2d: _attrs("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.AvgPool2d: _attrs("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.AdaptiveAvgPool2d: _attrs("output_size"),
    nn.Dropout: _attrs("p"),
    nn.ReLU: lambda mod: {},
    nn.GELU: _attrs("approximate"),
    nn.Tanh: lambda mod: {},
    nn.Sigmoid: lambda mod: {},
    nn.Identity: lambda mod: {},
}
_TYPES = {cls.__name__: cls for cls in _ARGS}


def architecture(model: nn.Module) -> list[dict[str, Any]]:
    """The layer list (type and constructor arguments) that :func:`build` turns back into an equal model."""
    if type(model) is not nn.Sequential:
        raise ValueError(
            "structured pruning supports nn.Sequential models (e.g. digits-cnn, digits-mlp), "
            f"got {type(model).__name__}"
        )
    layers = []
    for name, mod in model.named_children():
        if type(mod) not in _ARGS:
            raise ValueError(
                f"structured pruning does not support layer {name!r} ({type(mod).__name__}); "
                f"supported: {', '.join(sorted(_TYPES))}"
            )
        if isinstance(mod, nn.Flatten) and mod.start_dim != 1:
            raise ValueError(f"layer {name!r}: only Flatten(start_dim=1) keeps channels contiguous")
        layers.append({"type": type(mod).__name__, "args": _ARGS[type(mod)](mod)})
    return layers


def build(layers: list[dict[str, Any]]) -> nn.Sequential:
    """Instantiate an :func:`architecture` layer list."""
    return nn.Sequential(*(_TYPES[spec["type"]](**spec["args"]) for spec in layers))


def _weighted(model: nn.Sequential) -> list[int]:
    return [i for i, mod in enumerate(model) if isinstance(mod, nn.Conv2d | nn.Linear)]


def prunable_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose output channels/units may be removed: every Conv2d/Linear but the last."""
    architecture(model)
    return _weighted(model)[:-1]


def slice_channels(model: nn.Module, keep: dict[int, torch.Tensor]) -> nn.Sequential:
    """A new, physically smaller model keeping output channels ``keep[i]`` of each prunable layer ``i``.

    Its outputs equal those of ``model`` with the dropped channels' consumers (next layer's inputs) zeroed.
    """
    layers = architecture(model)
    bad = set(keep) - set(prunable_layers(model))
    if bad:
        raise ValueError(f"keep names non-prunable layers {sorted(bad)}; prunable: {prunable_layers(model)}")
    state: dict[str, torch.Tensor] = {}
    current: torch.Tensor | None = None  # kept indices of the channel/feature dimension flowing forward
    channels = 0
    for i, mod in enumerate(model):
        args = layers[i]["args"]
        params = {k: v.detach().clone() for k, v in mod.state_dict().items()}
        if isinstance(mod, nn.Conv2d | nn.Linear):
            dim_in = "in_channels" if isinstance(mod, nn.Conv2d) else "in_features"
            if current is not None:
                params["weight"] = params["weight"][:, current]
                args[dim_in] = len(current)
            out = keep.get(i)
            if out is not None:
                out = torch.unique(out.to(torch.long))  # sorted, no repeats
                if len(out) == 0 or out.min() < 0 or out.max() >= mod.weight.shape[0]:
                    raise ValueError(f"keep[{i}] must select 1..{mod.weight.shape[0]} valid channels")
                params = {k: v[out] for k, v in params.items()}
                args["out_channels" if isinstance(mod, nn.Conv2d) else "out_features"] = len(out)
            current, channels = out, mod.weight.shape[0]
        elif isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d) and current is not None:
            params = {k: v if v.dim() == 0 else v[current] for k, v in params.items()}
            args["num_features"] = len(current)
        elif isinstance(mod, nn.Flatten) and current is not None:
            features = next((m.in_features for m in model[i + 1 :] if isinstance(m, nn.Linear)), None)
            if features is None or features % channels:
                raise ValueError(f"Flatten at {i}: the next Linear's in_features must be a multiple of {channels}")
            per_channel = features // channels
            current = (current[:, None] * per_channel + torch.arange(per_channel)).flatten()
        state.update({f"{i}.{k}": v for k, v in params.items()})
    sliced = build(layers).to(next(model.parameters()))  # same dtype and device as the source model
    sliced.load_state_dict(state)
    return sliced.train(model.training)


def beta_rank_scores(model: nn.Module, calibration: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Beta-Rank score per output channel of each prunable layer, summed over the calibration batches."""
    if not calibration:
        raise ValueError("calibration must hold at least one input batch for beta-rank")
    targets = prunable_layers(model)
    scores = {i: torch.zeros(model[i].weight.shape[0], dtype=torch.float64) for i in targets}

    def hook(index: int) -> Callable[..., None]:
        def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x, y = inputs[0].double(), output.double()
            if isinstance(mod, nn.Conv2d):
                patches = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, C·k·k, P)
                b = patches.std(dim=(0, 1), unbiased=False)  # (P,)
                a = y.flatten(2).std(dim=0, unbiased=False)  # (F, P)
            else:
                b = x.std(unbiased=False).reshape(1)
                a = y.std(dim=0, unbiased=False)[:, None]
            live = b > 0
            ratio = (a[:, live] / b[live]).sum(dim=1)
            scores[index] += mod.weight.detach().double().abs().flatten(1).mean(dim=1) * ratio

        return record

    handles = [model[i].register_forward_hook(hook(i)) for i in targets]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return scores


def synflow_masks(
    model: nn.Module, density: float, example: torch.Tensor, rounds: int = SYNFLOW_ROUNDS
) -> dict[int, torch.Tensor]:
    """Iterative SynFlow (Tanaka et al. 2020) to global ``density``: layer index -> boolean mask of its weight.

    The network is linearized (|θ|, float64, eval mode), scored with ``|θ ⊙ ∂R/∂θ|`` for R = sum of the output on
    an all-ones input shaped like ``example``, and pruned globally over ``rounds`` rounds on the exponential
    schedule ``density^(k/rounds)``.
    """
    architecture(model)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    net = copy.deepcopy(model).double().eval()
    weighted = _weighted(net)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()  # SynFlow linearizes the network: |θ|, all-ones input
    weights = [net[i].weight for i in weighted]
    dense = [w.detach().clone() for w in weights]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    total = sum(w.numel() for w in weights)
    ones = torch.ones_like(example[:1], dtype=torch.float64)
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for w, d, m in zip(weights, dense, masks, strict=True):
                w.copy_(d * m)
        net.zero_grad()
        net(ones).sum().backward()
        scores = [(w.grad * w).detach().abs() for w in weights]
        kept = max(1, round(density ** (k / rounds) * total))
        threshold = torch.topk(torch.cat([s.flatten() for s in scores]), kept).values[-1]
        masks = [(s >= threshold) & m for s, m in zip(scores, masks, strict=True)]  # pruned stays pruned
    return {i: m.to(model[i].weight.device) for i, m in zip(weighted, masks, strict=True)}


def synflow_densities(
    model: nn.Module, density: float, example: torch.Tensor, rounds: int = SYNFLOW_ROUNDS
) -> dict[int, float]:
    """Per-layer kept fraction of each Conv2d/Linear weight after iterative SynFlow to global ``density``."""
    return {i: m.float().mean().item() for i, m in synflow_masks(model, density, example, rounds).items()}


def precrop_widths(model: nn.Module, sparsity: float, example: torch.Tensor) -> dict[int, int]:
    """PreCropping channel widths of the prunable layers for parameter ``sparsity`` (SynFlow densities → a_l)."""
    densities = synflow_densities(model, 1.0 - sparsity, example)
    widths, ratio = {}, 1.0
    for i in prunable_layers(model):
        ratio = min(1.0, densities[i] / ratio)
        channels = model[i].weight.shape[0]
        widths[i] = max(1, min(channels, round(ratio * channels)))
        ratio = widths[i] / channels  # the next layer's input ratio is what was actually kept
    return widths


def _keep_top(model: nn.Module, scores: dict[int, torch.Tensor], widths: dict[int, int]) -> nn.Sequential:
    return slice_channels(model, {i: torch.topk(scores[i], widths[i]).indices for i in widths})


def _check_structured(model: nn.Module, sparsity: float, calibration: list[torch.Tensor]) -> None:
    architecture(model)  # unsupported models fail here, naming the layer, before any work
    check_sparsity(sparsity)
    if not calibration:
        raise ValueError("calibration must hold at least one input batch")


@register_compressor(
    "beta-rank",
    paper="Beta-Rank: A Robust Convolutional Filter Pruning Method For Imbalanced Medical Image Analysis",
    summary="channels/units ranked by mean absolute weight times output-over-input spread, physically sliced",
    kind="structured",
    level="sparsity",
    needs=("calibration",),
)
def beta_rank(model: nn.Module, *, sparsity: float, calibration: list[torch.Tensor]) -> nn.Sequential:
    """Removes round(sparsity·c) of the c channels of every prunable layer, lowest Beta-Rank scores first."""
    _check_structured(model, sparsity, calibration)
    scores = beta_rank_scores(model, calibration)
    return _keep_top(model, scores, {i: max(1, len(s) - round(sparsity * len(s))) for i, s in scores.items()})


@register_compressor(
    "precrop",
    paper="Structured Pruning is All You Need for Pruning CNNs at Initialization (PreCropping)",
    summary="layer widths from SynFlow's per-layer densities (sparsity counts weights), physically sliced",
    kind="structured",
    level="sparsity",
    needs=("calibration",),
)
def precrop(model: nn.Module, *, sparsity: float, calibration: list[torch.Tensor]) -> nn.Sequential:
    """``sparsity`` is the fraction of weights to remove; SynFlow's per-layer densities set each layer's width,
    and the largest-L2-norm filters are kept (at initialization the choice is immaterial; on a trained model it
    keeps most of the function). Only the first calibration batch's shape is used."""
    _check_structured(model, sparsity, calibration)
    widths = precrop_widths(model, sparsity, calibration[0])
    return _keep_top(model, {i: model[i].weight.detach().flatten(1).norm(dim=1) for i in widths}, widths)


def structured_prune(model: nn.Module, method: str, sparsity: float, calibration: list[torch.Tensor]) -> nn.Sequential:
    """A new, physically smaller copy of ``model`` with channels/units removed by ``method`` (:data:`METHODS`);
    ``calibration`` is a list of input batches."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return get_compressor(method).function(model, sparsity=sparsity, calibration=calibration)


METHODS = tuple(compressor_names("structured"))


def save_structured(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s tensors (:func:`trainlab.compress.storage.save`: atomic, tied weights once) with its layer
    widths in the metadata."""
    save(path, model.state_dict(), metadata={_METADATA_KEY: json.dumps(architecture(model))})


def load_structured(path: str | Path) -> nn.Sequential:
    """Rebuild the model written by :func:`save_structured`."""
    meta = read_metadata(path)
    if _METADATA_KEY not in meta:
        raise ValueError(f"{path} has no {_METADATA_KEY!r} metadata: not written by save_structured")
    model = build(json.loads(meta[_METADATA_KEY]))
    state, _ = load(path)
    model.load_state_dict(state, assign=True)  # keeps the file's dtypes (float64 stays float64)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "METHODS",
    "architecture",
    "beta_rank_scores",
    "beta_rank",
    "build",
    "load_structured",
    "parameter_count",
    "precrop",
    "precrop_widths",
    "prunable_layers",
    "save_structured",
    "slice_channels",
    "structured_prune",
    "synflow_densities",
    "synflow_masks",
]
