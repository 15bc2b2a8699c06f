"""Step time, SVD-refresh cost and memory of trainlab's ``galore`` against the ``galore-torch`` package.

Both optimizers run on the same stack of MLP blocks (d -> 4d -> d linear pairs, biases included) with
fixed random gradients, GaLore rank ``--rank`` on every weight matrix and AdamW on the biases, SVD refresh
every ``--gap`` steps. Per optimizer: the median time of a step without a refresh (wall and process CPU
time; the CPU time is less sensitive to other jobs on a shared machine), the extra time of a step with
one (amortized per step at the paper's update_proj_gap 200), the exact optimizer-state bytes, and the
peak resident memory the optimizer added while stepping (Linux VmHWM; each run in a fresh process).
trainlab's full-rank ``adamw`` on the same model is a reference row.

galore-torch 1.0 imports ``transformers`` (only for a version check) and ``bitsandbytes`` (only for its
8-bit class) when the package is imported; neither is needed by ``galore_torch.AdamW``, so when they are
not installed, import-only stand-ins are put in ``sys.modules`` and the package's own AdamW and projector
code runs unchanged.

    python benchmarks/low_rank.py --threads 1 --out benchmarks/results/low_rank.md
    python benchmarks/low_rank.py --threads 1 --live-memory   # peak of live bytes, not of glibc's heap
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from report import publish  # benchmarks/report.py (the script directory is on sys.path)
from torch import nn

from trainlab.lab.memory import peak_rss_bytes, reset_peak_rss
from trainlab.optim import create, state_bytes

PAPER_GAP = 200
BASELINE = "galore-torch 1.0 (GaLoreAdamW)"
ADAMW = "trainlab adamw (full-rank reference)"


def import_galore_torch() -> type[torch.optim.Optimizer] | None:
    """``galore_torch.AdamW``, with import-only stand-ins for transformers/bitsandbytes where missing."""
    try:
        import transformers.utils.versions  # noqa: F401
    except ImportError:
        versions = types.ModuleType("transformers.utils.versions")
        versions.require_version = lambda *args, **kwargs: None
        for name in ("transformers", "transformers.utils"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["transformers.utils.versions"] = versions
    try:
        import bitsandbytes.optim.optimizer  # noqa: F401
    except ImportError:
        stub = types.ModuleType("bitsandbytes.optim.optimizer")
        stub.Optimizer2State = type("Optimizer2State", (), {})
        for name in ("bitsandbytes", "bitsandbytes.optim"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["bitsandbytes.optim.optimizer"] = stub
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        return None
    return GaLoreAdamW


def make_model(width: int, blocks: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, 4 * width), nn.Linear(4 * width, width)]
    return nn.Sequential(*layers)


def galore_torch_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Its moments live in ``state``; its projector's basis is a plain attribute of a Python object."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and v.ortho_matrix is not None:
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


Factory = Callable[[nn.Module], torch.optim.Optimizer]


def factories(args: argparse.Namespace) -> dict[str, tuple[Factory, Callable[[torch.optim.Optimizer], int]]]:
    hp = {"lr": 0.01, "rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25, "weight_decay": 0.0}
    out: dict[str, tuple[Factory, Callable[[torch.optim.Optimizer], int]]] = {
        "trainlab galore": (lambda m: create("galore", m.parameters(), **hp), state_bytes),
        ADAMW: (lambda m: create("adamw", m.parameters(), lr=0.01, weight_decay=0.0), state_bytes),
    }
    galore_adamw = import_galore_torch()
    if galore_adamw is not None:

        def theirs(m: nn.Module) -> torch.optim.Optimizer:
            mats = [p for p in m.parameters() if p.ndim == 2]
            rest = [p for p in m.parameters() if p.ndim != 2]
            low = {"rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25, "proj_type": "std"}
            return galore_adamw(
                [{"params": rest}, {"params": mats, **low}], lr=0.01, weight_decay=0.0, no_deprecation_warning=True
            )

        out[BASELINE] = (theirs, galore_torch_state_bytes)
    return out


def measure(name: str, args: argparse.Namespace) -> dict[str, float | torch.Tensor]:
    """One run of optimizer ``name``; called in a fresh process so that peak RSS is its own. Also returns
    the final parameters, to check that both implementations compute the same GaLore."""
    torch.set_num_threads(args.threads)
    make, count = factories(args)[name]
    torch.manual_seed(0)
    model = make_model(args.width, args.blocks)
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    # Before the memory baseline, load what the first optimizer of a process loads whichever it is: the
    # LAPACK/BLAS kernels and torch.optim's lazy imports (~90 MiB of modules on the first Optimizer()), so
    # that the peak counts the optimizer's own memory.
    warm = torch.randn(64, 64)
    torch.linalg.svd(warm)
    torch._foreach_add_([warm @ warm, warm.mT @ warm], [warm, warm], alpha=0.5)
    torch.optim.SGD([nn.Parameter(warm)], lr=0.1).step()
    reset_peak_rss()
    before = peak_rss_bytes()
    opt = make(model)
    plain, refresh, plain_cpu = [], [], []
    for step in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        (refresh if step % args.gap == 0 else plain).append(dt)
        if step % args.gap:
            plain_cpu.append(dc)
    peak = peak_rss_bytes() - before
    step_s = statistics.median(plain)
    svd_s = statistics.median(refresh[1:] or refresh) - step_s  # skip step 0 (also allocates the state)
    final = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {
        "step_s": step_s,
        "step_cpu_s": statistics.median(plain_cpu),
        "svd_s": svd_s,
        "state": count(opt),
        "peak": peak,
        "params": final,
    }


def run(args: argparse.Namespace) -> str:
    rows: dict[str, list[dict[str, float | torch.Tensor]]] = {name: [] for name in factories(args)}
    if args.live_memory:  # glibc reads this when a process starts: the spawned runs inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    context = multiprocessing.get_context("spawn")
    for _ in range(args.rounds):  # interleaved rounds: shared-machine noise hits both alike
        for name in rows:
            with context.Pool(1) as pool:  # a fresh process per run (a reused one hung with maxtasksperchild=1)
                rows[name].append(pool.apply(measure, (name, args)))
    model = make_model(args.width, args.blocks)
    n = sum(p.numel() for p in model.parameters())
    lines = [
        f"GaLore step on {args.blocks} MLP blocks {args.width}->{4 * args.width}->{args.width} "
        f"({n / 1e6:.1f}M params), "
        f"rank {args.rank}, refresh every {args.gap} steps, {args.threads} thread(s), medians of {args.rounds} "
        f"rounds x {args.steps} steps; torch {torch.__version__}"
        + ("; MALLOC_MMAP_THRESHOLD_=65536 (peak RSS = live bytes)" if args.live_memory else ""),
        "",
        "| optimizer | step (ms) | step CPU time (ms) | SVD refresh (ms) | refresh amortized at T=200 (ms/step) "
        "| state (MiB) | peak RSS added (MiB) | step vs galore-torch (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("step_s", "step_cpu_s", "svd_s", "state", "peak")
    summary = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in rows.items()}
    base = summary.get(BASELINE)
    for name, s in summary.items():
        ratio = f"{s['step_s'] / base['step_s']:.2f} / {s['step_cpu_s'] / base['step_cpu_s']:.2f}" if base else "n/a"
        svd = "- | -" if name == ADAMW else f"{1e3 * s['svd_s']:.1f} | {1e3 * s['svd_s'] / PAPER_GAP:.3f}"
        times = f"{1e3 * s['step_s']:.2f} | {1e3 * s['step_cpu_s']:.2f}"
        memory = f"{s['state'] / 2**20:.2f} | {s['peak'] / 2**20:.1f}"
        lines.append(f"| {name} | {times} | {svd} | {memory} | {ratio} |")
    if base is None:
        lines += ["", "galore-torch is not installed (`pip install galore-torch==1.0 --no-deps`): no baseline row."]
    else:
        gap = (rows["trainlab galore"][0]["params"] - rows[BASELINE][0]["params"]).abs().max().item()
        lines += ["", f"Same computation: max |param difference| after {args.steps} steps = {gap:.2e} (float32)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=10, help="refresh period used for timing (not the paper's 200)")
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--live-memory",
        action="store_true",
        help="serve every allocation over 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so that peak RSS is the peak "
        "of live bytes, without glibc heap retention; slows every step down (page faults)",
    )
    args = parser.parse_args()
    table = run(args)
    publish(table, args.out)


if __name__ == "__main__":
    main()
