"""``trainlab compress``: train (or reuse a cached) workload model, compress it (prune at one or more
sparsities, optionally recovering with PERP, or quantize at a bit-width), evaluate, export, and write report.md,
results.json and (several sparsities) a plot."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

METHODS = ("magnitude", "nm", "beta-rank", "precrop")
STRUCTURED = ("beta-rank", "precrop")
RECOVERY = ("perp",)


def quant_methods() -> tuple[str, ...]:
    from trainlab.compress.quant.apply import METHODS as QUANT

    return tuple(QUANT)


def _bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits expects a number of bits like 3 or 2.5, got {text!r}") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"--bits must lie in [2, 8], got {text!r}")
    return value


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity expects numbers like 0.5,0.7,0.9, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--sparsity values must lie in [0, 1), got {text!r}")
    return values


def _pattern(text: str) -> str:
    from trainlab.compress.prune import parse_pattern

    try:
        n, m = parse_pattern(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--pattern: {err}") from None
    return f"{n}:{m}"


def add_compress_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``compress`` subcommand on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    from trainlab.compress.pipeline import ALLOCATORS, QUANT_ALLOCATORS

    quant = quant_methods()
    p = subparsers.add_parser(
        "compress", help="prune or quantize a workload's trained model; write report, results and plot"
    )
    p.add_argument("--workload", required=True, help="workload name (see trainlab list)")
    p.add_argument(
        "--method",
        required=True,
        choices=METHODS + quant,
        help="pruning: magnitude (unstructured), nm (N:M by magnitude), beta-rank / precrop (channels, physically "
        f"sliced); quantization (with --bits): {', '.join(quant)}",
    )
    p.add_argument(
        "--sparsity",
        type=_sparsities,
        default=None,
        help="global sparsity in [0, 1), or a comma-separated list (default for nm: 1 - N/M)",
    )
    p.add_argument("--pattern", type=_pattern, default=None, help="N:M pattern for --method nm (N < M; default 2:4)")
    p.add_argument(
        "--allocator",
        choices=tuple(dict.fromkeys(ALLOCATORS + QUANT_ALLOCATORS)),
        default="uniform",
        help=f"how the budget is split over layers: sparsity for magnitude ({', '.join(ALLOCATORS)}), bit-widths "
        f"for quantization ({', '.join(QUANT_ALLOCATORS)}; --bits is then the average)",
    )
    p.add_argument(
        "--bits", type=_bits, default=None, help="quantization bit-width (average with a mixed-precision allocator)"
    )
    p.add_argument(
        "--second-order", action="store_true", help="GPTQ-style error compensation with calibration Hessians"
    )
    p.add_argument(
        "--group-size", type=int, default=None, help="quantization group of input columns (default: whole row)"
    )
    p.add_argument("--recover", choices=RECOVERY, default=None, help="retrain after pruning")
    p.add_argument("--recover-steps", type=int, default=150, help="retraining steps for --recover")
    p.add_argument("--steps", type=int, default=None, help="training steps of the dense model (default: workload's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dense training run")
    p.add_argument(
        "--calibration-batches", type=int, default=4, help="training batches for calibrated allocators / methods"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where trained dense checkpoints are reused from (default: $XDG_CACHE_HOME/trainlab or ~/.cache/trainlab)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_compress)
    return p


def _check_quant(args: argparse.Namespace) -> None:
    """Impossible quantization argument combinations raise ValueError naming the argument."""
    from trainlab.compress.pipeline import QUANT_ALLOCATORS
    from trainlab.compress.quant.apply import METHODS as QUANT

    spec = QUANT[args.method]
    for flag, value in (("--sparsity", args.sparsity), ("--pattern", args.pattern), ("--recover", args.recover)):
        if value is not None:
            raise ValueError(f"{flag} applies to pruning methods, not --method {args.method} (quantization)")
    if args.calibration_batches <= 0:
        raise ValueError(f"--calibration-batches must be a positive integer, got {args.calibration_batches}")
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if args.group_size is not None and args.group_size < 1:
        raise ValueError(f"--group-size must be a positive integer, got {args.group_size}")
    if args.group_size is not None and not spec.grouped:
        raise ValueError(f"--group-size does not apply to --method {args.method} (one codebook per layer)")
    if args.bits is None:
        if spec.bits is None or len(spec.bits) != 1:
            raise ValueError(f"--method {args.method} needs --bits (2 to 8)")
        args.bits = float(spec.bits[0])
    if args.allocator not in QUANT_ALLOCATORS:
        raise ValueError(
            f"--allocator {args.allocator} is a pruning allocator; quantization takes one of: "
            f"{', '.join(QUANT_ALLOCATORS)}"
        )
    if args.allocator == "baq" and args.method != "rtn":
        raise ValueError(
            f"--allocator baq quantizes with its own uniform per-column grid: use --method rtn, not {args.method}"
        )
    if args.allocator != "uniform" and not spec.mixed:
        raise ValueError(f"--allocator {args.allocator}: --method {args.method} has a fixed bit-width")
    if args.allocator == "uniform" and args.bits != int(args.bits):
        raise ValueError(f"--bits {args.bits:g} is fractional; only a mixed-precision --allocator takes averages")
    if spec.bits is not None and args.allocator == "uniform" and int(args.bits) not in spec.bits:
        raise ValueError(f"--bits for --method {args.method} must be one of {', '.join(map(str, spec.bits))}")
    if args.second_order and spec.second_order == "never":
        raise ValueError(f"--second-order is not available for --method {args.method}")


def _check(args: argparse.Namespace) -> list[float]:
    """The sparsities to run; impossible argument combinations raise ValueError naming the argument."""
    from trainlab.compress.prune import parse_pattern

    for flag, value in (
        ("--bits", args.bits),
        ("--group-size", args.group_size),
        ("--second-order", args.second_order or None),
    ):
        if value is not None:
            raise ValueError(
                f"{flag} applies to quantization methods ({', '.join(quant_methods())}), not --method {args.method}"
            )

    from trainlab.compress.pipeline import ALLOCATORS

    if args.allocator not in ALLOCATORS:
        raise ValueError(
            f"--allocator {args.allocator} allocates bit-widths (quantization); pruning takes one of: "
            f"{', '.join(ALLOCATORS)}"
        )
    if args.recover_steps <= 0:
        raise ValueError(f"--recover-steps must be a positive integer, got {args.recover_steps}")
    if args.calibration_batches <= 0:
        raise ValueError(f"--calibration-batches must be a positive integer, got {args.calibration_batches}")
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if args.pattern is not None and args.method != "nm":
        raise ValueError(f"--pattern applies to --method nm only, not {args.method}")
    if args.recover == "perp" and args.method in STRUCTURED:
        raise ValueError(f"--recover perp applies to masked models (magnitude, nm), not --method {args.method}")
    if args.allocator != "uniform" and args.method != "magnitude":
        raise ValueError(f"--allocator {args.allocator} applies to --method magnitude only, not {args.method}")
    if args.method == "nm":
        args.pattern = args.pattern or "2:4"
        n, m = parse_pattern(args.pattern)
        implied = 1 - n / m
        if args.sparsity is not None and any(abs(s - implied) > 1e-9 for s in args.sparsity):
            raise ValueError(f"--sparsity for --method nm must be 1 - N/M = {implied:g} (--pattern {args.pattern})")
        return [implied]
    if args.sparsity is None:
        raise ValueError(f"--method {args.method} needs --sparsity (a number or comma-separated list in [0, 1))")
    return args.sparsity


def _compress_one(
    args: argparse.Namespace, model: nn.Module, sparsity: float, calibration: list[torch.Tensor], out: Path
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """The compressed model, its exported file and its per-layer levels."""
    from trainlab.compress.export import save_compressed
    from trainlab.compress.masks import sparsity as layer_sparsity
    from trainlab.compress.pipeline import allocate_magnitude, magnitude_plan
    from trainlab.compress.plan import Plan, compressible_layers

    tag = f"{args.method}-{sparsity:g}"
    if args.method in STRUCTURED:
        from trainlab.compress.structured import save_structured, structured_prune

        pruned = structured_prune(model, args.method, sparsity, calibration)
        path = out / f"model-{tag}.safetensors"
        save_structured(pruned, path)
        widths = {n: int(m.weight.shape[0]) for n, m in compressible_layers(pruned).items()}
        return pruned, path, widths
    pruned = copy.deepcopy(model)
    if args.method == "nm":
        m = int(args.pattern.split(":")[1])
        fits = [n for n, layer in compressible_layers(pruned).items() if layer.weight.shape[1] % m == 0]
        if not fits:
            raise ValueError(f"--pattern {args.pattern}: no layer's input dimension is divisible by M={m}")
        plan = Plan.from_levels("nm", dict.fromkeys(fits, args.pattern))
    else:
        kept = allocate_magnitude(pruned, args.allocator, sparsity, calibration, progress=not args.quiet)
        plan = magnitude_plan(pruned, kept)
    plan.apply(pruned)
    (out / f"plan-{tag}.json").write_text(plan.to_json())
    if args.recover == "perp":
        from trainlab.compress.recover import recover_perp
        from trainlab.lab.workloads import get_workload

        recover_perp(
            pruned, get_workload(args.workload), steps=args.recover_steps, seed=args.seed + 1, progress=not args.quiet
        )
    path = out / f"model-{tag}.safetensors"
    save_compressed(pruned, path, metadata={"plan": plan.to_json()})
    zeros = layer_sparsity(pruned)
    return pruned, path, {k: round(zeros.get(k, 0.0), 6) for k in compressible_layers(pruned)}


PER_SPARSITY = ("sparsity", "metric_after", "file_bytes_after", "levels")


def results_json(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict: the shared keys once; ``sparsity``, ``metric_after``, ``file_bytes_after`` and ``levels`` are
    scalars (dict for levels) for one sparsity and lists aligned with ``sparsity`` for several; ``runs`` always
    lists the per-sparsity records."""
    out = {k: v for k, v in records[0].items() if k not in PER_SPARSITY}
    for key in PER_SPARSITY:
        values = [r[key] for r in records]
        out[key] = values[0] if len(records) == 1 else values
    out["runs"] = records
    return out


def _dense_setup(args: argparse.Namespace) -> tuple[Any, Path, nn.Module, float, int, list[torch.Tensor]]:
    """The workload's trained dense model (cached), its metric and saved size, and calibration batches."""
    from trainlab.compress.calibrate import calibration_inputs
    from trainlab.compress.export import save_dense
    from trainlab.compress.pipeline import default_cache_dir, trained_model
    from trainlab.lab.workloads import get_workload

    workload = get_workload(args.workload)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model = trained_model(workload, args.seed, args.steps, cache, progress=not args.quiet)
    before = workload.evaluate(model)
    dense_bytes = save_dense(model, out / "model-dense.safetensors")
    return workload, out, model, before, dense_bytes, calibration_inputs(workload, args.calibration_batches)


def run_compress(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    torch.set_num_threads(1)
    if args.method in quant_methods():
        return run_quantize(args)
    sparsities = _check(args)
    workload, out, model, before, dense_bytes, calibration = _dense_setup(args)
    records = []
    for s in tqdm(sparsities, desc="sparsities", disable=args.quiet or len(sparsities) == 1):
        pruned, path, levels = _compress_one(args, model, s, calibration, out)
        records.append(
            {
                "workload": args.workload,
                "method": args.method,
                "allocator": args.allocator,
                "pattern": args.pattern,
                "recover": args.recover,
                "metric": workload.metric,
                "higher_is_better": workload.higher_is_better,
                "metric_before": before,
                "file_bytes_before": dense_bytes,
                "sparsity": s,
                "metric_after": workload.evaluate(pruned),
                "file_bytes_after": path.stat().st_size,
                "levels": levels,
            }
        )
    (out / "results.json").write_text(json.dumps(results_json(records), indent=1))
    (out / "report.md").write_text(_report(records))
    if len(records) > 1:
        _plot(records, out / "metric_vs_sparsity.png")
    print((out / "report.md").read_text())
    return 0


def _report(records: list[dict[str, Any]]) -> str:
    r0 = records[0]
    lines = [
        f"# trainlab compress: {r0['workload']}, {r0['method']}"
        + (f" ({r0['allocator']} allocator)" if r0["method"] == "magnitude" else "")
        + (f", recovered with {r0['recover']}" if r0["recover"] else ""),
        "",
        f"| sparsity | {r0['metric']} before | {r0['metric']} after | file bytes before | file bytes after | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['sparsity']:g} | {r['metric_before']:.4f} | {r['metric_after']:.4f} | {r['file_bytes_before']} "
            f"| {r['file_bytes_after']} | {r['file_bytes_after'] / r['file_bytes_before']:.3f} |"
        )
    lines += [
        "",
        "Sparsity is the fraction of Linear/Conv weights removed (embeddings, norms and biases stay dense); file "
        "bytes are the safetensors exports (compact sparse encoding, or the sliced model for structured methods).",
        "",
        "Per-layer levels (sparsity per layer; output channels for structured methods):",
        "",
    ]
    for r in records:
        lines.append(f"- sparsity {r['sparsity']:g}: " + ", ".join(f"`{k}` {v}" for k, v in r["levels"].items()))
    return "\n".join(lines) + "\n"


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["sparsity"] for r in records]
    ax.plot(xs, [r["metric_after"] for r in records], marker="o", label=records[0]["method"])
    ax.axhline(records[0]["metric_before"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(records[0]["metric"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize the workload's trained model; write the packed file, results.json and report.md."""
    from trainlab.compress.quant.apply import save_quantized_model

    _check_quant(args)
    workload, out, model, before, dense_bytes, calibration = _dense_setup(args)
    qm = _quantize(args, workload, model, calibration)
    levels = qm.bits
    path = out / f"model-{args.method}-{args.bits:g}bit.safetensors"
    size = save_quantized_model(qm, path, metadata={"workload": args.workload, "allocator": args.allocator})
    counts = _layer_sizes(model)
    mean_bits = sum(levels[k] * n for k, n in counts.items()) / sum(counts.values())
    record = {
        "workload": args.workload,
        "method": args.method,
        "allocator": args.allocator,
        "second_order": qm.second_order,
        "group_size": args.group_size,
        "metric": workload.metric,
        "higher_is_better": workload.higher_is_better,
        "metric_before": before,
        "file_bytes_before": dense_bytes,
        "bits": args.bits,
        "mean_bits": round(mean_bits, 4),
        "metric_after": workload.evaluate(qm.model),
        "file_bytes_after": size,
        "levels": levels,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1))
    (out / "report.md").write_text(_quant_report(record))
    print((out / "report.md").read_text())
    return 0


def _quantize(args: argparse.Namespace, workload: Any, model: nn.Module, calibration: list[torch.Tensor]) -> Any:
    """The QuantizedModel for the parsed arguments: BAQ (per-column bits) or per-layer bits then the method."""
    from trainlab.compress.pipeline import allocate_bits, calibration_batches
    from trainlab.compress.quant.apply import METHODS as QUANT
    from trainlab.compress.quant.apply import layer_gradients, quantize_model, quantize_model_baq

    if args.allocator == "baq":
        return quantize_model_baq(model, args.bits, calibration, group_size=args.group_size)
    options = {} if args.allocator == "uniform" else {"group_size": args.group_size}
    try:
        levels = allocate_bits(model, args.allocator, args.bits, args.method, calibration, **options)
    except ValueError as err:
        raise ValueError(f"--allocator {args.allocator} --bits {args.bits:g}: {err}") from None
    gradients = None
    if QUANT[args.method].needs_gradient:
        gradients = layer_gradients(model, calibration_batches(workload, args.calibration_batches), workload.loss)
    return quantize_model(
        model,
        args.method,
        levels,
        second_order=args.second_order,
        calibration=calibration,
        group_size=args.group_size,
        gradients=gradients,
    )


def _layer_sizes(model: nn.Module) -> dict[str, int]:
    from trainlab.compress.plan import compressible_layers

    return {k: m.weight.numel() for k, m in compressible_layers(model).items()}


def _quant_report(r: dict[str, Any]) -> str:
    ratio = r["file_bytes_after"] / r["file_bytes_before"]
    lines = [
        f"# trainlab compress: {r['workload']}, {r['method']} at {r['bits']:g} bits ({r['allocator']} allocator"
        + (", second-order compensation)" if r["second_order"] else ")"),
        "",
        f"| bits | {r['metric']} before | {r['metric']} after | file bytes before | file bytes after | ratio |",
        "|---|---|---|---|---|---|",
        f"| {r['bits']:g} (mean {r['mean_bits']:g}) | {r['metric_before']:.4f} | {r['metric_after']:.4f} "
        f"| {r['file_bytes_before']} | {r['file_bytes_after']} | {ratio:.3f} |",
        "",
        "Every Linear/Conv weight is quantized (embeddings, norms and biases stay float32); the file after is the "
        "packed safetensors export (codes, float16 scales, ...), the file before the float32 one.",
        "",
        "Bits per layer: " + ", ".join(f"`{k}` {v}" for k, v in r["levels"].items()),
    ]
    return "\n".join(lines) + "\n"
