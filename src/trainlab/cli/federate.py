"""``trainlab federate``: simulate federated training of a workload with a federated strategy against a baseline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trainlab.cli.bench import parse_hyperparameters


def run(args: argparse.Namespace) -> int:
    from trainlab.lab.federate import FederateJob, federate

    job = FederateJob(
        workload=args.workload,
        strategy=args.strategy,
        baseline=args.baseline,
        clients=args.clients,
        rounds=args.rounds,
        participation=args.participation,
        alpha=args.alpha,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        failure_rate=args.failure_rate,
        seed=args.seed,
        eval_every=args.eval_every,
        engine=args.engine,
        speeds=args.speeds,
        byzantine=args.byzantine,
        attack=args.attack,
        hyperparameters=parse_hyperparameters(args.hp),
    )
    job.check()  # bad flags are named before any optional dependency is looked for
    flower_names = any(name.startswith("flwr-") for name in (args.strategy, args.baseline))
    if args.engine == "flower" or args.export_app or flower_names:
        try:
            import flwr  # noqa: F401
        except ImportError:
            raise ValueError(
                "--engine flower, --export-app and flwr-* strategies need Flower: pip install 'trainlab[federated]'"
            ) from None
    if args.engine == "ray":
        try:
            import ray  # noqa: F401  (checked first: flwr.simulation exits the process when Ray is missing)
        except ImportError:
            raise ValueError(
                "--engine ray needs Flower's Ray simulation (ray 2.55.1, about 220 MB): "
                "pip install 'trainlab[federated-ray]' (or: pip install 'flwr[simulation]>=1.42,<1.43')"
            ) from None
    if args.export_app:
        from trainlab.lab.federate_app import export_app

        app_dir = export_app(job, Path(args.export_app))
        print(
            f"Flower app written to {app_dir}. Run it on a SuperLink with {job.clients} SuperNodes (trainlab "
            "installed there; start flower-superlink with --disable-runtime-dependency-installation):\n"
            f"  flwr run {app_dir} <superlink-connection> --stream"
        )
        return 0
    out = Path(args.out)
    summary = federate(job, out)
    print((out / "report.md").read_text(), end="")
    failures = sum(len(r["failures"]) for r in summary["results"].values())
    print(f"{len(summary['results'])} runs, {failures} client failures reported; files written to {out}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from trainlab.lab.federate import ATTACKS, DATA, ENGINES, PARTICIPATION, SPEEDS, strategy_choices

    server = strategy_choices()
    p = subparsers.add_parser("federate", help="simulate federated training: a strategy against a baseline")
    p.add_argument(
        "--workload", default="digits-mlp", choices=sorted(DATA), help="dataset and model (default digits-mlp)"
    )
    p.add_argument(
        "--strategy",
        default="fedau",
        choices=server,
        help="aggregation strategy (default fedau); fedfix and async run asynchronously (see --speeds), monna "
        "peer-to-peer against Byzantine machines (see --byzantine)",
    )
    p.add_argument(
        "--baseline",
        default="fedavg",
        choices=server,
        help="compared strategy (default fedavg: synchronous rounds for fedfix/async, plain averaging for monna)",
    )
    p.add_argument("--clients", type=int, default=50, help="number of clients (default 50)")
    p.add_argument("--rounds", type=int, default=200, help="number of rounds (default 200)")
    p.add_argument(
        "--participation",
        default="hetero",
        choices=PARTICIPATION,
        help="who participates: hetero (Bernoulli, rates 0.02..0.9 unknown to the server), uniform (0.5), markov, "
        "cyclic (default hetero)",
    )
    p.add_argument(
        "--speeds",
        default="hetero",
        choices=SPEEDS,
        help="fedfix/async: client compute times, hetero (1.0..0.1) or uniform (1.0); --rounds is then the "
        "simulated wall time and --eval-every time units (default hetero)",
    )
    p.add_argument(
        "--byzantine",
        type=float,
        default=0.0,
        help="monna: fraction of the clients that are Byzantine, in [0, 0.5) (default 0); --rounds is then steps",
    )
    p.add_argument("--attack", default="signflip", choices=ATTACKS, help="monna: what the Byzantine machines send")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label concentration of the split (default 0.1)")
    p.add_argument("--local-steps", type=int, default=5, help="local SGD steps per round (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="local batch size (default 16)")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (default 0.05)")
    p.add_argument("--failure-rate", type=float, default=0.0, help="chance a participant drops out mid-round")
    p.add_argument("--eval-every", type=int, default=10, help="rounds between validations (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        default="inprocess",
        choices=ENGINES,
        help="inprocess: trainlab's driver; flower: Flower's strategy loop on an in-process message grid; ray: "
        "Flower's Ray simulation (extra federated-ray; ~30 s of Ray start-up)",
    )
    p.add_argument("--hp", action="append", default=[], help="strategy hyperparameter KEY=VALUE (repeatable)")
    p.add_argument("--out", default="federate-out", help="output directory (default federate-out)")
    p.add_argument(
        "--export-app",
        metavar="DIR",
        help="write the job (strategy only) as a Flower app for SuperLink + SuperNodes instead of running it",
    )
    p.set_defaults(func=run)
    return p
