"""The hyperparameters a lab run uses: the algorithm's paper defaults, the workload's tuned values, the user's
overrides. Apart from the bench so that workloads and the workload glue can resolve them without importing it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainlab.lab import local
from trainlab.lab.workloads.base import Workload


def resolve_hyperparameters(
    algorithm: str, workload: Workload, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Paper defaults, then the workload's tuned values, then the user's overrides (validated)."""
    spec = local.algorithm_spec(algorithm)
    hp = dict(spec.defaults)
    hp.update({k: v for k, v in local.tuned_hyperparameters(algorithm, workload).items() if k in spec.defaults})
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping):
            if key == algorithm:
                hp.update(value)
            continue
        hp[key] = value
    unknown = set(hp) - set(spec.defaults)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {sorted(unknown)} for {algorithm!r}; "
            f"allowed: {', '.join(sorted(spec.defaults))}"
        )
    return hp
