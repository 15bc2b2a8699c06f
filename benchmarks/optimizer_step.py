"""Time ``optimizer.step()`` of trainlab recipes against reference implementations, in one process.

A ~10M-parameter stack of 1024x1024 linear layers gets fixed random gradients; each optimizer takes
``--warmup`` steps, then the median of ``--repeats`` timed steps is reported. Rows:

- ``adamw`` vs ``torch.optim.AdamW(foreach=True)`` (goal: ratio <= 1.1);
- ``lion``, ``diffgrad``, ``spam``, ``stable-spam`` vs the same optimizers of the ``pytorch_optimizer``
  package, timed with its default settings and with ``foreach=True``; the faster of the two is the baseline
  (goal: ratio <= 1.0);
- every name in `EXTRA_ROWS` that is registered (``muon`` vs ``torch.optim.Muon``), on a bias-free model.

"Traffic" is the least memory an optimizer step must move: read the gradient, read and write the parameter
and every state tensor. Its rate is compared with a plain copy of the parameters (read + write).

    python benchmarks/optimizer_step.py --threads 1 --out benchmarks/results/optimizer_step.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainlab.optim import create, optimizer_names
from trainlab.optim.accounting import state_bytes

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Row:
    ours: str  # registered trainlab name
    baselines: dict[str, Factory]  # label -> factory; the fastest is the baseline
    goal: float
    bias: bool = True  # Muon-style rows need matrices only
    repeats: int | None = None  # None: --repeats


def _pytorch_optimizer(name: str) -> dict[str, Factory]:
    """The class ``name`` of pytorch_optimizer, with its default foreach setting and with foreach=True."""
    try:
        import pytorch_optimizer
    except ImportError:
        return {}
    cls = getattr(pytorch_optimizer, name, None)
    if cls is None:
        return {}
    return {
        f"pytorch_optimizer.{name}": lambda p: cls(p),
        f"pytorch_optimizer.{name}(foreach=True)": lambda p: cls(p, foreach=True),
    }


def _rows() -> list[Row]:
    rows = [
        Row("adamw", {"torch.optim.AdamW(foreach=True)": lambda p: torch.optim.AdamW(p, foreach=True)}, 1.1),
        Row("lion", _pytorch_optimizer("Lion"), 1.0),
        Row("diffgrad", _pytorch_optimizer("DiffGrad"), 1.0),
        Row("spam", _pytorch_optimizer("SPAM"), 1.0),
        Row("stable-spam", _pytorch_optimizer("StableSPAM"), 1.0),
    ]
    return rows + [row for name, row in EXTRA_ROWS.items() if name in optimizer_names()]


# Hook for recipes written elsewhere: a row is benchmarked as soon as its name is registered.
# Newton–Schulz on ten 1024x1024 matrices takes seconds per step on a CPU core, hence the few repeats.
EXTRA_ROWS: dict[str, Row] = {
    "muon": Row("muon", {"torch.optim.Muon": lambda p: torch.optim.Muon(p)}, 1.1, bias=False, repeats=3),
}


def make_model(width: int, depth: int, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=bias) for _ in range(depth)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def copy_bandwidth(params: list[torch.Tensor], repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` over tensors of the parameters' sizes (read + write)."""
    src = [p.detach().clone() for p in params]
    dst = [torch.empty_like(p) for p in params]
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        torch._foreach_copy_(dst, src)
        times.append(time.perf_counter() - t0)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return 2 * nbytes / statistics.median(times[2:])


def measure(model: nn.Module, factories: dict[str, Factory], warmup: int, repeats: int) -> dict[str, float]:
    """Median step seconds of each optimizer, each on its own copy of ``model``.

    Steps of the different optimizers alternate, so load from other processes on a shared machine hits
    all of them alike.
    """
    optimizers = {}
    for label, factory in factories.items():
        fresh = copy.deepcopy(model)
        for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
            p.grad = q.grad.clone()
        optimizers[label] = factory(list(fresh.parameters()))
    times: dict[str, list[float]] = {label: [] for label in factories}
    for i in range(warmup + repeats):
        for label, optimizer in optimizers.items():
            t0 = time.perf_counter()
            optimizer.step()
            if i >= warmup:
                times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}


def traffic_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Read the gradient, read and write the parameters and all optimizer state."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * param_bytes + 2 * state_bytes(optimizer)


def bench_row(row: Row, args: argparse.Namespace, copy_rate: float) -> str:
    """One table line: our step time, the fastest baseline's, their ratio and our traffic rate."""
    model = make_model(args.width, args.depth, row.bias)
    ours = f"trainlab {row.ours}"
    factories = {ours: lambda p: create(row.ours, p), **row.baselines}
    timed = measure(model, factories, args.warmup, row.repeats or args.repeats)
    ours_s = timed.pop(ours)
    optimizer = create(row.ours, list(model.parameters()))
    optimizer.step()  # materializes the state whose bytes count as traffic
    rate = traffic_bytes(model, optimizer) / ours_s
    if timed:
        label, base_s = min(timed.items(), key=lambda kv: kv[1])
        ratio = ours_s / base_s
        base = f"{label} | {base_s * 1e3:.1f} | {ratio:.2f}{'' if ratio <= row.goal else ' (over)'} | <= {row.goal}"
    else:
        base = "(none: pytorch_optimizer lacks it) | | | "
    return f"| {row.ours} | {base} | {ours_s * 1e3:.1f} | {rate / 1e9:.2f} | {100 * rate / copy_rate:.0f}% |"


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    copy_rate = copy_bandwidth(list(make_model(args.width, args.depth, True).parameters()), args.repeats)
    lines = [
        f"Optimizer step on {args.depth} x Linear({args.width}, {args.width}), torch {torch.__version__}, "
        f"{args.threads} thread(s), median of {args.repeats} steps after {args.warmup} warmup steps "
        "(steps of ours and the baselines alternate).",
        "",
        "| ours | baseline | baseline ms | ratio | goal | ours ms | ours traffic GB/s | % of copy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in _rows():
        lines.append(bench_row(row, args, copy_rate))
        print(lines[-1], flush=True)
    lines += ["", f"Plain copy of the parameters: {copy_rate / 1e9:.2f} GB/s (read + write)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    table = run(args)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
