"""The front door of compression: :func:`allocate_plan` turns one global budget into a :class:`~.plan.Plan`, and
:func:`compress` applies any plan to any ``nn.Module`` (Hugging Face models included) and returns a new model.

``compress`` never touches the caller's model (not its weights, modes or ``requires_grad`` flags): it works on
a deep copy. Each layer gets at most one pruning rule and one quantizer (:meth:`.plan.Plan.resolve`); a pruned
and quantized layer is pruned first, its pruned weight quantized, and the mask kept, so its zeros stay zeros
(any value the quantizer put at a pruned position is cleared and counted in the report). Calibration batches
reach the model as :mod:`.batches` says (tensors, keyword dicts, ``(inputs, targets)`` pairs).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainlab.compress.batches import OutputFn, model_input, run_batch
from trainlab.compress.masks import apply_mask, get_mask
from trainlab.compress.plan import Plan, compressible_layers, matching, unsupported_layers
from trainlab.compress.prune import check_sparsity
from trainlab.compress.quant.grids import check_group_size
from trainlab.compress.registry import Allocation, CompressorSpec, get_allocator, get_compressor, parse_pattern
from trainlab.layer_weights import to_out_major, to_weight_layout, weight_matrix

Loss = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class LayerReport:
    """What one layer asked for (``prune``/``quantize``: ``(compressor, level)`` or None) and got: the fraction
    of exactly-zero weights and the bits per weight of its codes (the mean for per-column bits)."""

    prune: tuple[str, Any] | None
    quantize: tuple[str, Any] | None
    sparsity: float
    bits: float | None
    note: str = ""


@dataclass(frozen=True)
class CompressionReport:
    """Per compressed layer a :class:`LayerReport`; ``dense``: every layer left as it was, with the reason;
    ``sparsity``: exact zeros over all compressible weights; ``mean_bits``: bits per quantized weight."""

    layers: dict[str, LayerReport]
    dense: dict[str, str]
    sparsity: float
    mean_bits: float | None

    def __str__(self) -> str:
        lines = [
            f"sparsity {self.sparsity:.4f} over all compressible weights"
            + ("" if self.mean_bits is None else f"; {self.mean_bits:.4f} bits per quantized weight"),
            "",
            "| layer | pruning | quantizer | sparsity | bits | note |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in self.layers.items():
            prune = "-" if r.prune is None else f"{r.prune[0]} {r.prune[1]}"
            quant = "-" if r.quantize is None else r.quantize[0]
            bits = "-" if r.bits is None else f"{r.bits:g}"
            lines.append(f"| `{name}` | {prune} | {quant} | {r.sparsity:.4f} | {bits} | {r.note} |")
        lines += [f"| `{name}` | - | - | dense | - | {why} |" for name, why in self.dense.items()]
        return "\n".join(lines)


@dataclass
class CompressionResult:
    """``model``: a new model whose quantized ``nn.Linear`` layers are
    :class:`~.quantized_linear.QuantizedLinear` modules (low-bit kernels; each says its path in ``.kernel`` and
    why in ``.reason``) and every other compressed layer holds its weight as it dequantizes (masks kept); with
    ``runtime="float"`` every quantized layer too (:meth:`float_model` gives that form of any result);
    ``weights``: quantized layer -> packed object; ``bits``: quantized layer -> bit-width (mean for per-column
    bits); ``method``: the compressors used (``+``-joined); ``hessians``: the calibration Hessians used;
    ``runtime``: the ``runtime`` compress ran with."""

    model: nn.Module
    weights: dict[str, Any]
    bits: dict[str, float]
    report: CompressionReport
    plan: Plan
    method: str
    second_order: bool
    group_size: int | None
    hessians: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    runtime: str = "float"

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> int:
        """Write the compressed model through the one save path (:func:`.export.save_model`: packed layers, sparse
        masks, tied weights once; a sliced structured model with its architecture, :func:`.structured.
        save_structured`), with the method and the plan in the metadata; returns the file size in bytes. Reload
        with :func:`.export.load_model` (or :func:`.structured.load_structured`)."""
        if self.plan.structured is not None:
            from trainlab.compress.structured import save_structured

            save_structured(self.model, path)
            return Path(path).stat().st_size
        from trainlab.compress.export import save_model

        meta = {"method": self.method, "plan": self.plan.to_json(), **(metadata or {})}
        return save_model(self.model, path, self.weights, metadata=meta)

    def runtime_model(self, mode: str = "auto") -> nn.Module:
        """A copy of the model whose quantized ``nn.Linear`` layers are
        :class:`~.quantized_linear.QuantizedLinear` modules in ``mode`` (see that class; pruned positions stay
        exactly zero); ``result.model`` already is one, in the mode ``compress`` was given."""
        from trainlab.compress.quantized_linear import runtime_model

        model = self.float_model()
        return runtime_model(model, _masked(model, self.weights), mode=mode)

    def float_model(self) -> nn.Module:
        """The model with every quantized layer an ``nn.Linear`` (or conv) holding its dequantized weight, masks
        kept: ``model`` itself when compress ran with ``runtime="float"``, else a converted copy
        (:func:`~.quantized_linear.float_model`). What fine-tuning, Hessians and float exports need."""
        from trainlab.compress.quantized_linear import float_model

        return float_model(self.model)

    def quantized_weight_count(self) -> int:
        modules = dict(self.model.named_modules())
        return sum(
            m.in_features * m.out_features if not hasattr(m, "weight") else m.weight.numel()
            for m in (modules[k] for k in self.weights)
        )


def _masked(model: nn.Module, weights: Mapping[str, Any]) -> dict[str, Any]:
    """Each packed weight, wrapped with its layer's pruning mask (and N:M pattern) where the layer is masked."""
    from trainlab.compress.masks import mask_pattern
    from trainlab.compress.sparse_formats import MaskedWeight

    modules = dict(model.named_modules())
    return {
        n: q if get_mask(modules[n]) is None else MaskedWeight(q, get_mask(modules[n]), mask_pattern(modules[n]))
        for n, q in weights.items()
    }


def _check_finite(layers: Mapping[str, nn.Module]) -> None:
    for name, module in layers.items():
        if not torch.isfinite(module.weight.detach()).all():
            raise ValueError(
                f"layer {name!r} has NaN or inf weights; compressing them would give garbage (fix or exclude it)"
            )


def _output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss the model computes itself (a Hugging Face output's ``loss``, given labels in the batch)."""
    out = run_batch(model, batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            "gradient-aware compressors need loss= (loss(model, batch) -> scalar tensor), or a model whose output "
            "carries .loss (e.g. a Hugging Face model given labels in the batch)"
        )
    return loss


def _gradients(model: nn.Module, layers: Mapping[str, nn.Module], calibration: Sequence, loss: Loss | None) -> dict:
    from trainlab.compress.quant.gwq import collect_gradients

    frozen = [m.weight for m in layers.values() if not m.weight.requires_grad]
    for w in frozen:  # the gradient is measured on the copy, so the caller's flags are not at stake
        w.requires_grad_(True)
    try:
        return collect_gradients(model, calibration, loss or _output_loss, layers)
    finally:
        for w in frozen:
            w.requires_grad_(False)


def _uses_hessian(spec: CompressorSpec, second_order: bool) -> bool:
    if second_order and spec.second_order == "never":
        raise ValueError(f"method {spec.name!r} has no second-order error compensation (second_order=True)")
    return spec.second_order == "always" or (second_order and spec.second_order == "optional")


def _check_options(options: Mapping[str, Mapping[str, Any]], used: set[str]) -> dict[str, dict[str, Any]]:
    stray = sorted(set(options) - used)
    if stray:
        raise ValueError(f"options name compressors the plan does not use: {stray} (used: {sorted(used)})")
    return {name: get_compressor(name).check_hyperparameters(values) for name, values in options.items()}


def _structured(model: nn.Module, plan: Plan, calibration: Sequence, exclude: Any) -> CompressionResult:
    rule = plan.structured
    if exclude:
        raise ValueError(f"{rule.compressor!r} slices the whole model: exclude does not apply")
    spec = get_compressor(rule.compressor)
    new = spec.function(model, sparsity=rule.level, calibration=[model_input(b) for b in calibration])
    widths = {n: m.weight.shape[0] for n, m in compressible_layers(new).items()}
    before = compressible_layers(model)
    layers = {
        n: LayerReport((rule.compressor, rule.level), None, 0.0, None, f"{before[n].weight.shape[0]} -> {w} outputs")
        for n, w in widths.items()
    }
    kept = sum(m.weight.numel() for m in compressible_layers(new).values())
    total = sum(m.weight.numel() for m in before.values())
    report = CompressionReport(layers, {}, 1 - kept / total, None)
    return CompressionResult(new, {}, {}, report, plan, rule.compressor, False, None)


def _other_weighted(model: nn.Module) -> dict[str, str]:
    """Weight layers no compressor acts on, with the reason (they stay dense whatever the plan says)."""
    out = {name: f"{kind} layers are not compressed" for name, kind in unsupported_layers(model).items()}
    out.update(
        {name: "embeddings are not compressed" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    )
    return out


def _prune(module: nn.Module, compressor: str, level: Any) -> str | None:
    """Prune one layer of the copy in place; the reason when it must stay dense."""
    spec = get_compressor(compressor)
    weight = to_out_major(module, module.weight)  # N:M groups run along the inputs: a Conv1D's first dimension
    if spec.kind == "nm" and weight.shape[1] % (m := parse_pattern(level)[1]):
        return f"{compressor} {level}: input size {weight.shape[1]} is not a multiple of M={m}"
    mask = spec.function(weight, **{spec.level: level})
    apply_mask(module, to_weight_layout(module, mask), pattern=level if spec.kind == "nm" else None)
    return None


def compress(
    model: nn.Module,
    plan: Plan | Iterable[tuple[str, str, Any]],
    *,
    calibration: Sequence[Any] | None = None,
    loss: Loss | None = None,
    exclude: str | Iterable[str] = (),
    second_order: bool = False,
    sequential: bool = False,
    group_size: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    runtime: str | None = "auto",
) -> CompressionResult:
    """Apply ``plan`` to a copy of ``model``; the caller's model is not modified.

    ``calibration``: batches for the compressors that need them (Hessians for second order and ``vptq``/``baq``,
    gradients for ``gwq``); ``loss(model, batch) -> scalar`` for gradient-aware compressors (default: the
    output's own ``.loss``); ``exclude``: layer names or regexes left dense; ``second_order``: GPTQ-style error
    compensation for the quantizers that offer it; ``sequential``: with second order, each layer's Hessian is
    measured on what the already-compressed earlier layers produce, layer by layer in forward order (the GPTQ
    reference's calibration; default: every Hessian on the dense model in one pass, see docs/compression.md);
    ``group_size``: quantization groups of input columns; ``options``: ``{compressor: {hyperparameter: value}}``;
    ``hessians`` / ``gradients``: precomputed per-layer measurements (layer name -> tensor), used instead of
    measuring them on ``calibration``. ``runtime``: how quantized ``nn.Linear`` layers come back: ``"auto"``
    (default) as :class:`~.quantized_linear.QuantizedLinear` modules on the fastest correct path, ``"kernel"``,
    ``"cache"`` or ``"dequantize"`` (that module's modes), or ``"float"`` / None: ``nn.Linear`` layers holding
    the dequantized weights (what fine-tuning and gradient-based measurements need).
    """
    from trainlab.compress.quantized_linear import _swap, check_runtime

    runtime = check_runtime(runtime)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(second_order, bool):
        raise ValueError(f"second_order must be True or False, got {second_order!r}")
    if not isinstance(sequential, bool):
        raise ValueError(f"sequential must be True or False, got {sequential!r}")
    plan = plan if isinstance(plan, Plan) else Plan(plan)
    calibration = list(calibration or ())
    check_group_size(group_size)
    if plan.structured is not None:
        return _structured(model, plan, calibration, exclude)
    layers = compressible_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear, nn.Conv1d or nn.Conv2d layer to compress "
            "(embeddings, norms, Conv3d and transposed convolutions are not compressed)"
        )
    resolved = plan.resolve(model, exclude)
    _check_finite({n: layers[n] for n in resolved})
    quantizers = {n: r.quantize[0] for n, r in resolved.items() if r.quantize is not None}
    specs = {c: get_compressor(c) for c in set(quantizers.values())}
    opts = _check_options(options or {}, {c for r in resolved.values() for c, _ in filter(None, r)})
    for name, c in quantizers.items():
        if group_size is not None and not specs[c].grouped:
            raise ValueError(f"group_size does not apply to {c!r} (layer {name!r}): it has one codebook per layer")
    hessian_layers = [n for n, c in quantizers.items() if _uses_hessian(specs[c], second_order)]
    gradient_layers = [n for n, c in quantizers.items() if "gradient" in specs[c].needs]

    out = copy.deepcopy(model)
    out_layers = compressible_layers(out)
    if sequential and (not hessian_layers or hessians is not None):
        raise ValueError(
            "sequential=True measures second-order Hessians layer by layer: it needs a quantizer with second order "
            "(second_order=True) and calibration batches, not precomputed hessians="
        )
    if hessian_layers and hessians is None:
        if not calibration:
            names = sorted({quantizers[n] for n in hessian_layers})
            raise ValueError(f"second-order compensation ({', '.join(names)}) needs calibration inputs (calibration=)")
        if not sequential:
            from trainlab.compress.quant.gptq import collect_hessians

            hessians = collect_hessians(out, calibration, {n: out_layers[n] for n in hessian_layers})
    missing = [] if hessians is None else [n for n in hessian_layers if n not in hessians]
    if missing:
        raise ValueError(f"hessians lacks layers {missing}, which second-order quantization needs")
    if gradient_layers and gradients is None:
        if not calibration:
            raise ValueError("gradient-aware quantization needs calibration batches (calibration=) and a loss")
        gradients = _gradients(out, {n: out_layers[n] for n in gradient_layers}, calibration, loss)
    missing = [n for n in gradient_layers if gradients is None or n not in gradients]
    if missing:
        raise ValueError(f"gradient-aware quantization needs the loss gradient of layers {missing} (gradients=)")

    dense = {n: "excluded" if matching_any(n, exclude) else "no plan rule" for n in layers if n not in resolved}
    dense.update(_other_weighted(model))
    notes: dict[str, str] = {}
    for name, rules in resolved.items():
        if rules.prune is not None:
            skipped = _prune(out_layers[name], *rules.prune)
            if skipped is not None:
                notes[name] = skipped
    unpruned = set(notes)
    skipped_nm = [n for n in notes if resolved[n].quantize is None]
    for name in skipped_nm:
        dense[name] = notes.pop(name)
    if unpruned:
        warnings.warn(f"N:M pruning skipped layers whose input size is not a multiple of M: {sorted(unpruned)}",
                      stacklevel=2)  # fmt: skip

    packed, bits = {}, {}

    def quantize_layer(name: str, hessian: torch.Tensor | None) -> None:
        compressor = quantizers[name]
        spec, module = specs[compressor], out_layers[name]
        kwargs = {spec.level: resolved[name].quantize[1], **opts.get(compressor, {})}
        if spec.grouped:
            kwargs["group_size"] = group_size
        if hessian is not None:
            kwargs["hessian"] = hessian
        matrix = weight_matrix(module).detach()
        if name in gradient_layers:  # given in the weight's layout, like the weight
            kwargs["gradient"] = to_out_major(module, gradients[name]).reshape(matrix.shape).float()
        weight = module.weight.detach()
        q = spec.function(matrix.float(), **kwargs)
        value = to_weight_layout(module, q.dequantize(torch.float32)).to(weight.dtype)
        mask = get_mask(module)
        if mask is not None:
            moved = int((value[~mask] != 0).sum())
            if moved:
                notes[name] = f"{moved} pruned positions quantized off zero, cleared by the mask"
            value = value * mask
        with torch.no_grad():
            module.weight.copy_(value)
        packed[name] = q
        level = resolved[name].quantize[1]
        bits[name] = level if isinstance(level, int) else round(sum(level) / len(level), 6)
        if progress is not None:
            progress(1)

    if sequential:
        from trainlab.compress.quant.gptq import quantize_sequentially

        hessians = quantize_sequentially(out, calibration, {n: out_layers[n] for n in hessian_layers}, quantize_layer)
    for name in quantizers:
        if name not in packed:
            quantize_layer(name, hessians[name] if name in hessian_layers else None)

    report = _report(layers, out_layers, resolved, dense, notes, bits, unpruned)
    used = dict.fromkeys(c for r in resolved.values() for c, _ in filter(None, r))
    used_hessians = {n: hessians[n] for n in hessian_layers} if hessian_layers else {}
    if runtime != "float":
        out = _swap(out, _masked(out, packed), runtime)
    return CompressionResult(
        out, packed, bits, report, plan, "+".join(used), bool(hessian_layers), group_size, used_hessians, runtime
    )


def matching_any(name: str, patterns: str | Iterable[str]) -> bool:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return any(matching(p, [name]) for p in patterns)


def _report(
    layers: Mapping[str, nn.Module],
    out_layers: Mapping[str, nn.Module],
    resolved: Mapping[str, Any],
    dense: dict[str, str],
    notes: Mapping[str, str],
    bits: Mapping[str, float],
    unpruned: set[str],
) -> CompressionReport:
    zeros = {n: int((m.weight == 0).sum()) for n, m in out_layers.items()}
    total = sum(m.weight.numel() for m in layers.values())
    per_layer = {
        n: LayerReport(
            None if n in unpruned else r.prune,
            r.quantize,
            zeros[n] / out_layers[n].weight.numel(),
            bits.get(n),
            notes.get(n, ""),
        )
        for n, r in resolved.items()
        if n not in dense
    }
    quantized = sum(out_layers[n].weight.numel() for n in bits)
    mean_bits = sum(b * out_layers[n].weight.numel() for n, b in bits.items()) / quantized if quantized else None
    return CompressionReport(per_layer, dense, sum(zeros.values()) / total, mean_bits)


def allocate_plan(
    allocator: str,
    model: nn.Module,
    *,
    sparsity: float | None = None,
    bits: float | None = None,
    compressor: str | None = None,
    calibration: Sequence[Any] | None = None,
    loss: Loss | None = None,
    output_fn: OutputFn | None = None,
    exclude: str | Iterable[str] = (),
    second_order: bool = False,
    group_size: int | None = None,
    progress: bool = False,
    **hyperparameters: Any,
) -> Plan:
    """A :class:`Plan` spending one global budget — ``sparsity`` (exactly ``round(s * N)`` of the N weights of
    the allocated layers removed) or ``bits`` (exactly ``bits * N`` bits) — over the compressible layers of
    ``model`` not matched by ``exclude``, by the registered ``allocator``. ``compressor``: what the plan's rules
    name (default ``magnitude`` for sparsity, ``rtn`` for bits, ``baq`` for per-column allocators);
    ``second_order``: bit allocators measure quantization error with GPTQ instead of round-to-nearest;
    ``hyperparameters``: the allocator's (see its spec); ``loss(model, batch) -> scalar``: what loss-based
    sensitivities (hawq) differentiate; ``output_fn(model, batch) -> tensor``: the output that output-comparing
    measurements (KL, distortion) read, for models whose output is not a tensor, ``logits`` or
    ``last_hidden_state``. ``model`` is not modified."""
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be a callable output_fn(model, batch) -> tensor, got {output_fn!r}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable loss(model, batch) -> scalar tensor, got {loss!r}")
    if (sparsity is None) == (bits is None):
        raise ValueError("give exactly one budget: sparsity= (a fraction in [0, 1)) or bits= (average bits)")
    budget, value = ("sparsity", sparsity) if bits is None else ("bits", bits)
    spec = get_allocator(allocator, budget)
    hp = spec.check_hyperparameters(hyperparameters)
    if compressor is None:
        compressor = "magnitude" if budget == "sparsity" else "baq" if spec.per_column else "rtn"
    kind = get_compressor(compressor).kind
    if budget == "sparsity":
        check_sparsity(value)
        if kind != "mask":
            raise ValueError(f"sparsity allocators produce unstructured masks; compressor {compressor!r} is {kind}")
        if second_order:
            raise ValueError("second_order applies to bit allocators (their error measurements), not to sparsity")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"bits must be a number of bits per weight, got {value!r}")
    check_group_size(group_size)
    layers = compressible_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear, nn.Conv1d or nn.Conv2d layer to allocate over")
    chosen = {n: m for n, m in layers.items() if not matching_any(n, exclude)}
    for pattern in [exclude] if isinstance(exclude, str) else exclude:
        if not matching(pattern, layers):
            raise ValueError(f"exclude pattern {pattern!r} matches no compressible layer; layers are: {list(layers)}")
    if not chosen:
        raise ValueError("exclude leaves no layer to allocate over")
    _check_finite(chosen)
    context = Allocation(
        model, chosen, compressor, list(calibration or ()), loss, second_order, group_size, progress, output_fn
    )
    return spec.function(context, value, **hp)
