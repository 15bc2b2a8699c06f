"""Built-in workloads; importing this package registers them all (their data loads on first use)."""

from trainlab.lab.workloads import (  # noqa: F401  (registration side effect)
    digits,
    finetuning,
    minilm_docstrings,
    mnist1d,
    modadd,
    pylm,
    sbm,
)
from trainlab.lab.workloads.base import Workload, get_workload, register_workload, workload_names

__all__ = ["Workload", "get_workload", "register_workload", "workload_names"]
