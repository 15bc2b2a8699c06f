"""``trainlab list``: algorithms, workloads, schedules and claims."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> int:
    from trainlab.claims.registry import all_claims
    from trainlab.lab.workloads import get_workload, workload_names
    from trainlab.optim import get_spec, optimizer_names
    from trainlab.schedules import scheduler_names

    print("Algorithms (trainlab bench --algorithms, trainlab.optim.create):")
    for name in optimizer_names():
        spec = get_spec(name)
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        print(f"  {name:<14} {spec.paper}\n  {'':<14} {spec.summary}\n  {'':<14} defaults: {defaults}")
    from trainlab import localtrain

    print("\nWithout backprop (trainlab bench --algorithms backprop,NAME; trainlab.localtrain.create):")
    for name in localtrain.method_names():
        spec = localtrain.get_spec(name)
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        print(f"  {name:<14} {spec.paper}\n  {'':<14} {spec.summary}\n  {'':<14} defaults: {defaults}")
    from trainlab import adapters

    print("\nAdapters (trainlab finetune --adapter, trainlab.adapters.attach):")
    for name in adapters.adapter_names():
        spec = adapters.get_spec(name)
        defaults = ", ".join(f"{k}={f.default!r}" for k, f in spec.fields.items())
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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("list", help="list algorithms, workloads, schedules and claims")
    p.set_defaults(func=run)
    return p
