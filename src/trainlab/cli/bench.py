"""``trainlab bench``: train algorithms on workloads; write results, report and plots."""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def parse_hyperparameters(pairs: Sequence[str]) -> dict[str, Any]:
    """``["lr=3e-4", "adamw.betas=0.9,0.95"]`` -> ``{"lr": 3e-4, "adamw": {"betas": (0.9, 0.95)}}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--hp expects KEY=VALUE or ALGORITHM.KEY=VALUE, got {pair!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # plain strings such as k=l2 need no quotes
        algorithm, dot, name = key.rpartition(".")
        if dot:
            out.setdefault(algorithm, {})[name] = value
        else:
            out[name] = value
    return out


def run(args: argparse.Namespace) -> int:
    from trainlab.lab.bench import DEMO_WORKLOADS, BenchConfig, run_bench

    load_entry_points()
    for module in args.imports:  # user code that registers workloads with register_workload
        load_module(module)
    workloads = args.workload
    if args.model is not None or args.data is not None:
        workloads = [*(workloads or []), _user_workload(args)]
    config = BenchConfig(
        workloads=workloads or list(DEMO_WORKLOADS),
        algorithms=args.algorithms,
        seeds=args.seeds,
        steps=args.steps,
        out=Path(args.out),
        hyperparameters=parse_hyperparameters(args.hp),
        schedule=args.schedule,
        schedule_options=_options(args.schedule_option),
        resume=args.resume,
        progress=not args.quiet,
        overwrite=args.overwrite,
        adapters=args.adapters or (),
        adapter_options=parse_hyperparameters(args.adapter_option),
        adapter_callbacks=parse_hyperparameters(args.adapter_callback),
        adapter_targets=args.adapter_targets,
    )
    if args.nproc > 1 or args.nnodes > 1 or args.compressor:
        if config.adapters:
            raise ValueError("--adapters runs in one process; drop --nproc, --nnodes and --compressor")
        return _run_distributed(args, config)
    try:
        results = run_bench(config)
    except KeyboardInterrupt:
        checkpoints = Path(args.out) / "checkpoints"
        print(
            f"\ntrainlab bench: interrupted. Finished runs are in {Path(args.out) / 'results.json'}, checkpoints in "
            f"{checkpoints}; run the same command with --resume to continue from them.",
            file=sys.stderr,
        )
        return 130
    print((Path(args.out) / "report.md").read_text())
    print(f"{len(results)} runs; results.json, report.md and plots written to {args.out}")
    return 0


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    options = parse_hyperparameters(pairs)
    nested = [k for k, v in options.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"--schedule-option expects KEY=VALUE, got a dotted key for {nested}")
    return options


ENTRY_POINTS = "trainlab.workloads"


def load_entry_points() -> None:
    """Import every installed package's ``trainlab.workloads`` entry point (its module registers workloads)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINTS):
        try:
            entry.load()
        except Exception as err:  # a broken plugin is named, not a traceback from deep inside it
            raise ValueError(
                f"entry point {entry.name} = {entry.value} ({ENTRY_POINTS}) failed to load: {err}"
            ) from None


def load_module(name: str) -> None:
    import importlib

    from trainlab.lab.user_models import load_object

    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        load_object(f"{name}:__name__", "--import")  # the same search path and message as --model


def _user_workload(args: argparse.Namespace) -> str:
    from trainlab.lab.user_workload import register_user_workload, user_workload

    if args.model is None or args.data is None:
        raise ValueError("--model and --data go together (the user's model factory and its batches)")
    workload = user_workload(
        args.model, args.data, loss=args.loss, steps=args.steps or 200, batch_size=args.batch_size, target=args.target
    )
    return register_user_workload(workload)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from trainlab.lab.bench import DEMO_ALGORITHMS, DEMO_WORKLOADS
    from trainlab.lab.user_models import SPEC_HELP

    p = subparsers.add_parser("bench", help="train algorithms on workloads; write results, report and plots")
    p.add_argument(
        "--workload", type=_csv, default=None, help=f"comma-separated workloads (default: {','.join(DEMO_WORKLOADS)})"
    )
    p.add_argument("--model", default=None, help=f"your own model: {SPEC_HELP.split(', or ')[1]} (with --data)")
    p.add_argument(
        "--data",
        default=None,
        help="your batches: pkg.module:make_batch (make_batch(batch_size, generator) -> batch) or pkg.module:batches "
        "(a list of batches or a callable returning one; the last fifth is held out for evaluation)",
    )
    p.add_argument("--loss", default=None, help="pkg.module:fn, fn(model, batch) -> scalar (default: see docs)")
    p.add_argument("--batch-size", type=int, default=32, help="with --data pkg.module:make_batch: its batch size")
    p.add_argument("--target", type=float, default=None, help="with --model: evaluation loss to reach (default: none)")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="PKG.MODULE",
        help="import your module first (repeatable), e.g. one that registers workloads with register_workload",
    )
    p.add_argument("--algorithms", type=_csv, default=list(DEMO_ALGORITHMS), help="comma-separated names")
    p.add_argument("--seeds", type=int, default=1, help="seeds per (workload, algorithm)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the workload's)")
    p.add_argument("--out", default="bench-out", help="output directory")
    p.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="[ALG.]KEY=VALUE",
        help="hyperparameter override, repeatable (e.g. --hp lr=3e-4 --hp adamw.weight_decay=0.1)",
    )
    p.add_argument("--schedule", default=None, help="learning-rate schedule (see trainlab list)")
    p.add_argument(
        "--schedule-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the schedule, repeatable (e.g. --schedule wsd --schedule-option decay=0.2)",
    )
    p.add_argument(
        "--adapters",
        type=_csv,
        default=None,
        help="compare adapter methods side by side (e.g. lora,lora-ga,full; 'full' = every parameter): each algorithm "
        "trains each adapter on the workload's model (see trainlab finetune)",
    )
    p.add_argument(
        "--adapter-option", action="append", default=[], metavar="METHOD.KEY=VALUE", help="an adapter's option"
    )
    p.add_argument(
        "--adapter-callback",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="an adapter's training-callback option (e.g. adalora.init_warmup=0)",
    )
    p.add_argument(
        "--adapter-targets",
        type=_csv,
        default=None,
        help="module names/suffixes/globs to adapt (default: the workload's)",
    )
    p.add_argument("--resume", action="store_true", help="continue runs from their checkpoints in --out")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results of a bench of another configuration in --out"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--config", default=None, metavar="RUN.TOML", help="options from a TOML file (the command line wins)"
    )
    _distributed_arguments(p)
    p.set_defaults(func=run)
    return p


def _distributed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, help="processes per node: train under torch.distributed (DDP)")
    p.add_argument(
        "--compressor",
        action="append",
        default=[],
        metavar="NAME[-FEEDBACK][:KEY=VALUE...]",
        help="with --nproc: gradient communication, repeatable or comma-separated: allreduce (plain DDP, the "
        "default), identity, topk, sign, count-sketch, each optionally -ef/-ef21/-ef21-w (e.g. topk-ef21:ratio=0.01)",
    )
    p.add_argument("--nnodes", type=int, default=1, help="machines (torchrun --nnodes); run the command on each")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank (0 writes the outputs)")
    p.add_argument("--master-addr", default=None, help="node 0's address (with --nnodes > 1)")
    p.add_argument("--master-port", type=int, default=None, help="a free port on node 0 (with --nnodes > 1)")


def _run_distributed(args: argparse.Namespace, config: Any) -> int:
    from trainlab.lab.distributed_run import PLAIN, launch_bench

    if args.model is not None or args.data is not None:
        raise ValueError("--nproc runs registered workloads; register yours in a module and pass --import")
    try:
        results = launch_bench(
            config,
            nproc=args.nproc,
            compressors=args.compressor or [PLAIN],
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=args.master_port,
            imports=args.imports,
        )
    except RuntimeError as err:  # a rank failed: its traceback is above, torchrun stopped the others
        print(f"trainlab bench: {err}", file=sys.stderr)
        return 1
    if results is None:
        print(f"node {args.node_rank}: done (node 0 writes the outputs)")
        return 0
    print((Path(args.out) / "report.md").read_text())
    print(f"{len(results)} runs on {args.nproc * args.nnodes} processes; outputs written to {args.out}")
    return 0
