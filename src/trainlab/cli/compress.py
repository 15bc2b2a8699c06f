"""``trainlab compress``: prune or quantize a workload's trained model (see :mod:`trainlab.lab.compress_run`).

Here: the flags, their checks (an impossible combination raises ValueError naming the flag) and printing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


def quant_methods() -> tuple[str, ...]:
    from trainlab.compress.registry import compressor_names

    return tuple(compressor_names("quantizer"))


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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``compress`` subcommand on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    from trainlab.compress import recover
    from trainlab.compress.registry import allocator_names, compressor_names
    from trainlab.lab.user_models import SPEC_HELP

    quant = quant_methods()
    pruning_allocators, bit_allocators = allocator_names("sparsity"), allocator_names("bits")
    p = subparsers.add_parser(
        "compress", help="prune or quantize a workload's trained model or your own; write report, results and plot"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", help="workload name (see trainlab list): its model is trained, then compressed")
    source.add_argument("--model", help=f"the model to compress: {SPEC_HELP}")
    p.add_argument(
        "--calibration",
        default=None,
        help="with --model: calibration batches from pkg.module:batches (a list of batches or a callable returning "
        "one; default for a Hugging Face directory: built-in sentences through its tokenizer)",
    )
    p.add_argument(
        "--method",
        required=True,
        choices=compressor_names(),
        help="pruning: magnitude (unstructured), nm (N:M by magnitude), beta-rank / precrop (channels, physically "
        f"sliced); quantization (with --bits): {', '.join(quant)} (baq with --allocator baq)",
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
        choices=allocator_names(),
        default="uniform",
        help=f"how the budget is split over layers: sparsity for magnitude ({', '.join(pruning_allocators)}), "
        f"bit-widths for quantization ({', '.join(bit_allocators)}; --bits is then the average)",
    )
    p.add_argument(
        "--bits", type=_bits, default=None, help="quantization bit-width (average with a mixed-precision allocator)"
    )
    p.add_argument(
        "--second-order", action="store_true", help="GPTQ-style error compensation with calibration Hessians"
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="with --second-order: each layer's Hessian on the outputs of the already-quantized earlier layers "
        "(the GPTQ reference's order; default: all Hessians on the dense model in one pass)",
    )
    p.add_argument(
        "--group-size", type=int, default=None, help="quantization group of input columns (default: whole row)"
    )
    p.add_argument(
        "--embedding-bits",
        type=int,
        default=None,
        help="also quantize embedding tables (rtn, one grid per row) at this bit-width (default: left dense)",
    )
    p.add_argument("--recover", choices=recover.METHODS, default=None, help="retrain after pruning")
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
    p.add_argument(
        "--config", default=None, metavar="RUN.TOML", help="options from a TOML file (the command line wins)"
    )
    p.set_defaults(func=run)
    return p


def _check_source(args: argparse.Namespace) -> None:
    """Flags that apply only to a workload (trained here) or only to the user's --model."""
    if args.model is None:
        if args.calibration is not None:
            raise ValueError("--calibration applies to --model; a workload's calibration comes from its own data")
        return
    for flag, value in (("--steps", args.steps), ("--cache-dir", args.cache_dir), ("--recover", args.recover)):
        if value is not None:
            raise ValueError(f"{flag} applies to --workload (a model trained here), not to --model")
    if args.seed != 0:
        raise ValueError("--seed applies to --workload (the dense training run), not to --model")


def _check_common(args: argparse.Namespace) -> None:
    from trainlab.lab.bench_files import check_writable

    _check_source(args)
    if args.embedding_bits is not None and not 2 <= args.embedding_bits <= 8:
        raise ValueError(f"--embedding-bits must be an integer in [2, 8], got {args.embedding_bits}")
    check_writable(Path(args.out))  # before any training
    if args.calibration_batches <= 0:
        raise ValueError(f"--calibration-batches must be a positive integer, got {args.calibration_batches}")
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")


def _check_quant(args: argparse.Namespace) -> float:
    """The bit-width to run; impossible quantization argument combinations raise ValueError naming the flag."""
    from trainlab.compress.registry import allocator_names, get_allocator, get_compressor

    spec = get_compressor(args.method)
    bit_allocators = allocator_names("bits")
    for flag, value in (("--sparsity", args.sparsity), ("--pattern", args.pattern), ("--recover", args.recover)):
        if value is not None:
            raise ValueError(f"{flag} applies to pruning methods, not --method {args.method} (quantization)")
    _check_common(args)
    if args.group_size is not None and args.group_size < 1:
        raise ValueError(f"--group-size must be a positive integer, got {args.group_size}")
    if args.group_size is not None and not spec.grouped:
        raise ValueError(f"--group-size does not apply to --method {args.method} (one codebook per layer)")
    bits = args.bits
    if bits is None:
        if spec.bits is None or len(spec.bits) != 1:
            raise ValueError(f"--method {args.method} needs --bits (2 to 8)")
        bits = float(spec.bits[0])
    if args.allocator not in bit_allocators:
        raise ValueError(
            f"--allocator {args.allocator} is a pruning allocator; quantization takes one of: "
            f"{', '.join(bit_allocators)}"
        )
    per_column = get_allocator(args.allocator, "bits").per_column
    if per_column != (spec.level == "column_bits"):
        raise ValueError(
            f"--allocator {args.allocator} and --method {args.method}: per-column bits go together "
            "(--method baq --allocator baq)"
        )
    if args.allocator != "uniform" and spec.fixed_width:
        raise ValueError(f"--allocator {args.allocator}: --method {args.method} has a fixed bit-width")
    if args.allocator == "uniform" and bits != int(bits):
        raise ValueError(f"--bits {bits:g} is fractional; only a mixed-precision --allocator takes averages")
    if spec.bits is not None and args.allocator == "uniform" and int(bits) not in spec.bits:
        raise ValueError(f"--bits for --method {args.method} must be one of {', '.join(map(str, spec.bits))}")
    if args.sequential and not args.second_order:
        raise ValueError("--sequential orders the second-order calibration: add --second-order")
    if args.second_order and spec.second_order == "never":
        raise ValueError(f"--second-order is not available for --method {args.method}")
    return bits


def _check_pruning(args: argparse.Namespace) -> tuple[list[float], str | None]:
    """The sparsities and N:M pattern to run; impossible combinations raise ValueError naming the flag."""
    from trainlab.compress.registry import allocator_names, compressor_names, parse_pattern

    allocators, structured = allocator_names("sparsity"), compressor_names("structured")

    for flag, value in (
        ("--bits", args.bits),
        ("--group-size", args.group_size),
        ("--second-order", args.second_order or None),
        ("--sequential", args.sequential or None),
    ):
        if value is not None:
            raise ValueError(
                f"{flag} applies to quantization methods ({', '.join(quant_methods())}), not --method {args.method}"
            )
    if args.allocator not in allocators:
        raise ValueError(
            f"--allocator {args.allocator} allocates bit-widths (quantization); pruning takes one of: "
            f"{', '.join(allocators)}"
        )
    if args.recover_steps <= 0:
        raise ValueError(f"--recover-steps must be a positive integer, got {args.recover_steps}")
    _check_common(args)
    if args.pattern is not None and args.method != "nm":
        raise ValueError(f"--pattern applies to --method nm only, not {args.method}")
    if args.recover == "perp" and args.method in structured:
        raise ValueError(f"--recover perp applies to masked models (magnitude, nm), not --method {args.method}")
    if args.allocator != "uniform" and args.method != "magnitude":
        raise ValueError(f"--allocator {args.allocator} applies to --method magnitude only, not {args.method}")
    if args.method == "nm":
        pattern = args.pattern or "2:4"
        n, m = parse_pattern(pattern)
        implied = 1 - n / m
        if args.sparsity is not None and any(abs(s - implied) > 1e-9 for s in args.sparsity):
            raise ValueError(f"--sparsity for --method nm must be 1 - N/M = {implied:g} (--pattern {pattern})")
        return [implied], pattern
    if args.sparsity is None:
        raise ValueError(f"--method {args.method} needs --sparsity (a number or comma-separated list in [0, 1))")
    return args.sparsity, None


def run(args: argparse.Namespace) -> int:
    from trainlab.lab.bench_files import write_run_record
    from trainlab.lab.compress_run import CompressionJob, prune_workload, quantize_workload
    from trainlab.lab.compress_user import compress_user_model

    torch.set_num_threads(1)
    common = {
        "workload": args.workload,
        "method": args.method,
        "out": Path(args.out),
        "allocator": args.allocator,
        "steps": args.steps,
        "seed": args.seed,
        "calibration_batches": args.calibration_batches,
        "cache_dir": Path(args.cache_dir) if args.cache_dir else None,
        "progress": not args.quiet,
        "model": args.model,
        "calibration": args.calibration,
        "embedding_bits": args.embedding_bits,
    }
    if args.method in quant_methods():
        bits = _check_quant(args)
        job = CompressionJob(
            **common, bits=bits, second_order=args.second_order, sequential=args.sequential, group_size=args.group_size
        )
        report = compress_user_model(job) if args.model else quantize_workload(job)
    else:
        sparsities, pattern = _check_pruning(args)
        job = CompressionJob(
            **common,
            sparsities=tuple(sparsities),
            pattern=pattern,
            recover=args.recover,
            recover_steps=args.recover_steps,
        )
        report = compress_user_model(job) if args.model else prune_workload(job)
    write_run_record(Path(args.out), {k: v for k, v in vars(args).items() if k != "func"})
    print(report.read_text())
    return 0
