"""Collectives per step under torch.distributed, counted, on 2 gloo processes (CPU).

FSDP2 (``fully_shard`` on each Linear and the model, DTensor parameters): for every trainlab optimizer, the
collectives its ``step`` issues on the sharded parameters, by kind, counted with
``torch.distributed.tensor.debug.CommDebugMode`` over the last of ``--steps`` steps (state exists by then), and
the median step time next to AdamW's in the same processes. An optimizer that refuses sharded parameters is
listed with its error. The forward and backward's own collectives (FSDP's all-gathers and reduce-scatters) are
the same for every optimizer and counted once.

DDP with the compression hook: collectives per training step (forward + backward + step) and the bytes one rank
sends per step, per compressor.

    python benchmarks/distributed.py --out benchmarks/results/distributed.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from report import publish  # benchmarks/report.py (the script directory is on sys.path)
from torch import nn

from trainlab import optim

HOOKS = {
    "allreduce (no hook)": None,
    "identity": ("identity", "none", {}),
    "topk 1% + EF21": ("topk", "ef21", {"ratio": 0.01}),
    "topk 1% + EF": ("topk", "ef", {"ratio": 0.01}),
    "sign + EF": ("sign", "ef", {}),
    "count-sketch 1/8": ("count-sketch", "none", {"ratio": 0.125}),
}


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def _sharded(width: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(width)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _counts(comm) -> dict[str, int]:
    return {str(k).rsplit(".", 1)[-1]: int(v) for k, v in comm.get_comm_counts().items()}


def _fsdp_row(name: str, rank: int, width: int, steps: int) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    model = _sharded(width)
    opt = optim.create(name, model.parameters())
    times, counts, fwd_bwd = [], {}, {}
    for step in range(steps):
        opt.zero_grad()
        x, y = _batch(rank, step)
        with CommDebugMode() as comm_fb:
            nn.functional.mse_loss(model(x), y).backward()
        dist.barrier()
        with CommDebugMode() as comm:
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        counts, fwd_bwd = _counts(comm), _counts(comm_fb)
    return {"counts": counts, "fwd_bwd": fwd_bwd, "step_ms": 1e3 * statistics.median(times[1:] or times)}


def _ddp_row(hook, rank: int, width: int, steps: int) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainlab.distributed import register_compression_hook

    ddp = DDP(_model(width))
    state = register_compression_hook(ddp, hook[0], feedback=hook[1], **hook[2]) if hook else None
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    counts, before = {}, 0
    for step in range(steps):
        x, y = _batch(rank, step)
        before = state.bytes_sent if state is not None else 0
        opt.zero_grad()
        with CommDebugMode() as comm:
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        counts = _counts(comm)
    dense = sum(p.numel() * p.element_size() for p in ddp.parameters())
    sent = dense if state is None else state.bytes_sent - before  # the last step (EF21's first one is dense)
    return {"counts": counts, "bytes": sent, "dense": dense}


def _worker(rank: int, store: str, out: str, names: list[str], width: int, steps: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # FSDP's and DDP's per-call UserWarnings on this toy model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        fsdp, ddp = {}, {}
        for name in names:
            try:
                fsdp[name] = _fsdp_row(name, rank, width, steps)
            except Exception as err:  # a refusal or a failure: recorded, the next optimizer runs
                fsdp[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
                if rank == 0 and not isinstance(err, ValueError | TypeError | NotImplementedError):
                    traceback.print_exc()
            dist.barrier()
        for label, hook in HOOKS.items():
            ddp[label] = _ddp_row(hook, rank, width, steps)
        if rank == 0:
            torch.save({"fsdp": fsdp, "ddp": ddp}, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="hidden width of the 3-layer MLP")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optimizers", default=None, help="comma-separated (default: every one but adahessian)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = args.optimizers.split(",") if args.optimizers else [n for n in optim.optimizer_names() if n != "adahessian"]
    import torch._dynamo  # noqa: F401  (imported once here, not in each forked child)

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.start_processes(_worker, args=(os.path.join(tmp, "store"), out, names, args.width, args.steps),
                           nprocs=2, start_method="fork")  # fmt: skip
        res = torch.load(out, weights_only=False)
    fsdp, ddp = res["fsdp"], res["ddp"]
    base = fsdp.get("adamw", {}).get("step_ms")
    fb = next((r["fwd_bwd"] for r in fsdp.values() if "fwd_bwd" in r), {})
    lines = [
        "## Collectives per step under torch.distributed (2 gloo processes, CPU)",
        "",
        f"torch {torch.__version__}, 1 thread per process; MLP 32-{args.width}-{args.width}-8, batch 16 per rank, "
        f"counted on the last of {args.steps} steps (`CommDebugMode`). Produced by `python benchmarks/distributed.py"
        f" --width {args.width} --steps {args.steps}`.",
        "",
        "### FSDP2 (`fully_shard` per Linear and the model): the optimizer step's collectives",
        "",
        f"Forward + backward (FSDP itself, the same for every optimizer): {_fmt_counts(fb)}.",
        "",
        "| optimizer | collectives in `step()` | total | step (ms, median) | vs adamw |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        r = fsdp[name]
        if "error" in r:
            lines.append(f"| {name} | refused / failed: `{r['error']}` | - | - | - |")
            continue
        ratio = f"{r['step_ms'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {_fmt_counts(r['counts'])} | {sum(r['counts'].values())} | {r['step_ms']:.2f} | {ratio} |"
        )
    lines += [
        "",
        "### DDP with the compression hook: one training step (forward, backward, SGD step)",
        "",
        "Bytes: this rank's payload in the last step's collectives (EF21 sends its first round dense).",
        "",
        "| communication | collectives per step | bytes sent per step (one rank) | vs dense |",
        "|---|---|---|---|",
    ]
    for label, r in ddp.items():
        lines.append(f"| {label} | {_fmt_counts(r['counts'])} | {r['bytes']:,.0f} | {r['bytes'] / r['dense']:.4f} |")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
