"""``trainlab finetune``: fine-tune a workload's pretrained model with adapters (or fully) and compare them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trainlab.cli.bench import _csv, parse_hyperparameters


def run(args: argparse.Namespace) -> int:
    import trainlab.adapters as adapters
    from trainlab.adapters.io import atomic_write
    from trainlab.lab.finetune import finetune, finetune_report
    from trainlab.lab.workloads import get_workload

    if args.model is not None or args.data is not None:
        workload = _user_workload(args)
    else:
        workload = get_workload(args.workload)
    methods = [None if m == "full" else m for m in args.adapter]
    for m in methods:
        if m is not None:
            adapters.get_spec(m)  # unknown names fail before any training
    settings = parse_hyperparameters(args.set)
    callbacks = parse_hyperparameters(args.callback)
    results = []
    for method in methods:
        shared = {k: v for k, v in settings.items() if not isinstance(v, dict)}
        config = {} if method is None else {**shared, **settings.get(method, {})}
        callback = {} if method is None else dict(callbacks.get(method, {}))
        if args.rank is not None and method is not None:
            if "r" not in adapters.get_spec(method).fields:
                raise ValueError(f"--rank: {method} has no rank r; set its options with --set {method}.KEY=VALUE")
            config["r"] = args.rank
        for seed in args.seeds:
            results.append(
                finetune(
                    workload,
                    method,
                    targets=args.targets,
                    config=config,
                    callback=callback,
                    optimizer=args.optimizer,
                    hyperparameters=parse_hyperparameters(args.hp),
                    seed=seed,
                    steps=args.steps,
                )
            )
    report = finetune_report(workload, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "method": r.method,
            "trainable": r.trainable,
            "total": r.total,
            "optimizer_state_bytes": r.optimizer_state_bytes,
            "peak_rss_bytes": r.peak_rss_bytes,
            "wall_time_s": r.run.wall_time_s,
            "final_metric": r.final_metric,
            "steps_to_target": r.run.steps_to_target,
            "curve": r.run.curve,
        }
        for r in results
    ]
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(report))
    print(report)
    print(f"{len(results)} runs; results.json and report.md written to {out}")
    return 0


def _user_workload(args: argparse.Namespace) -> Any:
    """The user's model and batches as a workload; quality is the loss on the held-out batches."""
    from trainlab.lab.user_workload import user_workload

    if args.model is None or args.data is None:
        raise ValueError("--model and --data go together (your model and its batches)")
    return user_workload(
        args.model, args.data, loss=args.loss, steps=args.steps or 200, batch_size=args.batch_size, target=args.target
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pretrained workload model with adapters (or fully) and compare them"
    )
    p.add_argument("--workload", default="digits-shifted", help="a fine-tuning workload (default digits-shifted)")
    p.add_argument(
        "--model",
        default=None,
        help="your own model instead of a workload: pkg.module:factory or a local Hugging "
        "Face directory (with --data; default targets: every nn.Linear)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="your batches: pkg.module:make_batch (make_batch(batch_size, generator) -> batch) or pkg.module:batches "
        "(a list of batches or a callable returning one; the last fifth is held out and its loss is the quality)",
    )
    p.add_argument("--loss", default=None, help="with --model: pkg.module:fn, fn(model, batch) -> scalar")
    p.add_argument("--batch-size", type=int, default=32, help="with --data pkg.module:make_batch: its batch size")
    p.add_argument("--target", type=float, default=None, help="with --model: held-out loss to reach (default: none)")
    p.add_argument("--adapter", type=_csv, default=["lora"], help="comma-separated adapter methods; 'full' = all")
    p.add_argument("--rank", type=int, default=None, help="r for every adapter that has one")
    p.add_argument(
        "--targets", type=_csv, default=None, help="module names/suffixes/globs to adapt (default: the workload's)"
    )
    p.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE", help="adapter options")
    p.add_argument(
        "--callback", action="append", default=[], metavar="METHOD.KEY=VALUE", help="training-callback options"
    )
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="optimizer hyperparameters")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=lambda t: [int(s) for s in _csv(t)], default=[0])
    p.add_argument("--out", default="finetune-results")
    p.set_defaults(func=run)
    return p
