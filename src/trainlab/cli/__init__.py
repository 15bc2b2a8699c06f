"""`trainlab` commands: thin wrappers that parse arguments, call the library and print."""

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


def _cmd_bench(args: argparse.Namespace) -> int:
    from trainlab.lab.bench import BenchConfig, run_bench

    config = BenchConfig(
        workloads=args.workload,
        algorithms=args.algorithms,
        seeds=args.seeds,
        steps=args.steps,
        out=Path(args.out),
        hyperparameters=parse_hyperparameters(args.hp),
        schedule=args.schedule,
        resume=args.resume,
        progress=not args.quiet,
    )
    results = run_bench(config)
    print((Path(args.out) / "report.md").read_text())
    print(f"{len(results)} runs; results.json, report.md and plots written to {args.out}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from trainlab.claims.registry import all_claims
    from trainlab.lab.workloads import get_workload, workload_names
    from trainlab.optim import get_spec, optimizer_names
    from trainlab.schedules import scheduler_names

    print("Algorithms (trainlab bench --algorithms, trainlab.optim.create):")
    for name in optimizer_names():
        spec = get_spec(name)
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        print(f"  {name:<14} {spec.paper}\n  {'':<14} {spec.summary}\n  {'':<14} defaults: {defaults}")
    print("\nWorkloads (trainlab bench --workload):")
    for name in workload_names():
        w = get_workload(name)
        print(f"  {name:<14} {w.description} [{w.metric}, target {w.target}, {w.steps} steps]")
    print("\nSchedules (trainlab bench --schedule): " + ", ".join(scheduler_names()))
    print("\nClaims (trainlab verify --only NAME):")
    for c in all_claims():
        print(f"  {c.name:<34} {'fast' if c.fast else 'slow'}  {c.promise}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from trainlab.claims.verify import render, verify

    verdicts = verify(fast_only=args.fast, only=args.only, out=Path(args.out), progress=not args.quiet)
    print(render(verdicts))
    print(f"written to {args.out}")
    return 0 if all(v.passed for v in verdicts) else 1


def _cmd_docs(args: argparse.Namespace) -> int:
    from trainlab.lab.docs import write_methods_table

    path = write_methods_table(Path(args.out))
    print(f"written {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from trainlab.lab.bench import DEMO_ALGORITHMS, DEMO_WORKLOADS

    bench = sub.add_parser("bench", help="train algorithms on workloads; write results, report and plots")
    bench.add_argument("--workload", type=_csv, default=list(DEMO_WORKLOADS), help="comma-separated workloads")
    bench.add_argument("--algorithms", type=_csv, default=list(DEMO_ALGORITHMS), help="comma-separated names")
    bench.add_argument("--seeds", type=int, default=1, help="seeds per (workload, algorithm)")
    bench.add_argument("--steps", type=int, default=None, help="steps per run (default: the workload's)")
    bench.add_argument("--out", default="bench-out", help="output directory")
    bench.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="[ALG.]KEY=VALUE",
        help="hyperparameter override, repeatable (e.g. --hp lr=3e-4 --hp adamw.weight_decay=0.1)",
    )
    bench.add_argument("--schedule", default=None, help="learning-rate schedule (see trainlab list)")
    bench.add_argument("--resume", action="store_true", help="continue runs from their checkpoints in --out")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)

    lst = sub.add_parser("list", help="list algorithms, workloads, schedules and claims")
    lst.set_defaults(func=_cmd_list)

    ver = sub.add_parser("verify", help="check each paper's claim; exit 1 if any fails")
    ver.add_argument("--fast", action="store_true", help="only the fast claims")
    ver.add_argument("--only", default=None, help="one claim (by name) or all claims of one method")
    ver.add_argument("--out", default="VERIFY.md", help="where to write the table")
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=_cmd_verify)

    docs = sub.add_parser("docs", help="regenerate the methods table (docs/methods.md)")
    docs.add_argument("--out", default="docs/methods.md")
    docs.set_defaults(func=_cmd_docs)

    from trainlab.compress.cli import add_compress_parser

    add_compress_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"trainlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
