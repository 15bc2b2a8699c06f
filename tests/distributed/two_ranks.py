"""Run a test module's computation on two gloo ranks (forked processes, once per module) and hand rank 0's
results to its tests. The ranks end with barrier + destroy_process_group even when the computation fails."""

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_two_ranks(compute: Callable[[int, str], dict[str, Any]]) -> dict[str, Any]:
    """``compute(rank, tmp_dir)`` on ranks 0 and 1 of a fresh process group; rank 0's returned dict."""
    import torch._dynamo  # noqa: F401  (DDP and FSDP import it on first use: once here, not in each child)

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        # fork, not spawn: the children inherit the imported torch instead of importing it again (seconds each)
        mp.start_processes(_rank, args=(compute, tmp, out), nprocs=2, start_method="fork")
        return torch.load(out, weights_only=True)


def _rank(rank: int, compute: Callable[[int, str], dict[str, Any]], tmp: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank, world_size=2)
    try:
        results = compute(rank, tmp)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()
