"""Time ``optimizer.step()`` of trainlab recipes against reference implementations, in one process.

A ~10M-parameter stack of 1024x1024 linear layers gets fixed random gradients; each optimizer takes
``--warmup`` steps, then the median of ``--repeats`` timed steps is reported. Rows:

- ``adamw`` vs ``torch.optim.AdamW(foreach=True)`` (goal: ratio <= 1.1);
- ``lion``, ``diffgrad``, ``spam``, ``stable-spam`` vs the same optimizers of the ``pytorch_optimizer``
  package, timed with its default settings and with ``foreach=True``; the faster of the two is the baseline
  (goal: ratio <= 1.0);
- ``muon`` vs ``pytorch_optimizer.Muon`` with the same routing (matrices to Muon, biases to its AdamW with
  the same lr/betas/eps), the same 5 Newton–Schulz steps with Keller Jordan's coefficients and the same
  shape scaling. pytorch_optimizer iterates in bfloat16; ours in float32 on the CPU by default, so Muon has
  two rows: the default, and ``ns_dtype=torch.bfloat16`` (the same precision as the baseline).

"Traffic" is the least memory an optimizer step must move: read the gradient, read and write the parameter
and every state tensor. Its rate is compared with ``torch._foreach_copy_`` over tensors of the parameters'
sizes (read + write), timed interleaved with the optimizer steps of the same row, so both see the same load.
Every row also times ``torch.optim.AdamW(fused=True)``, the fastest CPU optimizer step in torch, and reports our
step time as a ratio to it ("ours / fused AdamW").

With ``--compiled`` it times instead every elementwise recipe eager and compiled (``create(..., compile=True)``)
against ``torch.optim.AdamW(fused=True)`` and ``copy_``, all alternating in one loop (issue 12's goal: compiled
<= 1.15x fused AdamW). The compiled kernels are built for the thread count they run on, so run one process per
``--threads``:

    python benchmarks/optimizer_step.py --threads 1 --out benchmarks/results/optimizer_step.md
    python benchmarks/optimizer_step.py --compiled --threads 2 --out benchmarks/results/optimizer_step-compiled-2t.md
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
from report import publish  # benchmarks/report.py (the script directory is on sys.path)
from torch import nn

from trainlab.optim import create, optimizer_names
from trainlab.optim.accounting import state_bytes

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Row:
    ours: str  # registered trainlab name
    baselines: dict[str, Factory]  # label -> factory; the fastest is the baseline
    goal: float
    bias: bool = True
    repeats: int | None = None  # None: --repeats
    label: str | None = None  # the row's name, when it is not ``ours``
    tweak: Callable[[torch.optim.Optimizer], None] | None = None  # applied to our optimizer once built


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


def _pytorch_optimizer_muon() -> dict[str, Factory]:
    """pytorch_optimizer.Muon with our recipe's routing: 2-D parameters to Muon, the rest to its AdamW.

    Its defaults are ours: lr 0.02, momentum 0.95, Nesterov, 5 steps of the (3.4445, -4.7750, 2.0315)
    iteration, lr scaled by max(1, rows/cols)^0.5; AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-10, no decay.
    """
    try:
        from pytorch_optimizer import Muon
    except ImportError:
        return {}

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        matrices = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]
        return Muon([{"params": matrices, "use_muon": True}, {"params": others, "use_muon": False}])

    return {"pytorch_optimizer.Muon (NS in bf16)": factory}


def _muon_ns_bf16(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:  # what create("muon", ..., ns_dtype=torch.bfloat16) sets
        group["ns_dtype"] = torch.bfloat16


def _rows() -> list[Row]:
    # Newton–Schulz on ten 1024x1024 matrices takes seconds per step on a CPU core, hence the few repeats.
    return [
        Row("adamw", {"torch.optim.AdamW(foreach=True)": lambda p: torch.optim.AdamW(p, foreach=True)}, 1.1),
        Row("lion", _pytorch_optimizer("Lion"), 1.0),
        Row("diffgrad", _pytorch_optimizer("DiffGrad"), 1.0),
        Row("spam", _pytorch_optimizer("SPAM"), 1.0),
        Row("stable-spam", _pytorch_optimizer("StableSPAM"), 1.0),
        Row("muon", _pytorch_optimizer_muon(), 1.0, repeats=5, label="muon (NS fp32, our CPU default)"),
        Row("muon", _pytorch_optimizer_muon(), 1.0, repeats=5, label="muon (NS bf16)", tweak=_muon_ns_bf16),
    ]


# The highest anchor on the CPU: torch's fused AdamW kernel (one pass over parameter, gradient and moments),
# timed in every row so each recipe's step time is also reported as a ratio to it (issue 12's goal for the
# elementwise recipes: <= 1.15x).
ANCHOR = "torch.optim.AdamW(fused=True)"


def _fused_adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, fused=True)


def make_model(width: int, depth: int, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=bias) for _ in range(depth)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


class _Copy:
    """A pseudo-optimizer whose step is ``dst.copy_(src)`` over tensors of the parameters' sizes."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.src = [p.detach().clone() for p in params]
        self.dst = [torch.empty_like(p) for p in params]
        self.nbytes = 2 * sum(p.numel() * p.element_size() for p in params)  # read + write

    def step(self) -> None:
        torch._foreach_copy_(self.dst, self.src)


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


def bench_row(row: Row, args: argparse.Namespace) -> str:
    """One table line: our step time, the fastest baseline's, their ratio and our traffic rate vs copy_."""
    model = make_model(args.width, args.depth, row.bias)
    label = row.label or row.ours
    ours = f"trainlab {label}"

    def build(p: list[nn.Parameter]) -> torch.optim.Optimizer:
        optimizer = create(row.ours, p)
        if row.tweak is not None:
            row.tweak(optimizer)
        return optimizer

    copier = _Copy(list(model.parameters()))
    factories = {ours: build, **row.baselines, "copy_": lambda p: copier, ANCHOR: _fused_adamw}  # type: ignore[dict-item]
    timed = measure(model, factories, args.warmup, row.repeats or args.repeats)
    ours_s = timed.pop(ours)
    anchor = ours_s / timed.pop(ANCHOR)
    copy_rate = copier.nbytes / timed.pop("copy_")
    optimizer = build(list(model.parameters()))
    optimizer.step()  # materializes the state whose bytes count as traffic
    rate = traffic_bytes(model, optimizer) / ours_s
    if timed:
        base_label, base_s = min(timed.items(), key=lambda kv: kv[1])
        ratio = ours_s / base_s
        over = "" if ratio <= row.goal else " (over)"
        base = f"{base_label} | {base_s * 1e3:.1f} | {ratio:.2f}{over} | <= {row.goal}"
    else:
        base = "(none: pytorch_optimizer not installed or lacks it) | | | "
    return (
        f"| {label} | {base} | {ours_s * 1e3:.1f} | {anchor:.2f} | {rate / 1e9:.2f} | {copy_rate / 1e9:.2f} "
        f"| {100 * rate / copy_rate:.0f}% |"
    )


# The elementwise recipes of issue 12 (orthograd: ⊥Grad's projection runs eagerly, its AdamW compiled).
ELEMENTWISE = ("adamw", "sgd", "lion", "lion-k", "diffgrad", "spam", "stable-spam", "orthograd")
COMPILED_GOAL = 1.15


def compiled_row(name: str, args: argparse.Namespace) -> str:
    """One line: eager and compiled step times of ``name``, fused AdamW's, the ratios, and bandwidth vs copy_."""
    model = make_model(args.width, args.depth, True)
    copier = _Copy(list(model.parameters()))
    built: dict[str, torch.optim.Optimizer] = {}

    def build(compiled: bool) -> Factory:
        def factory(p: list[nn.Parameter]) -> torch.optim.Optimizer:
            built[str(compiled)] = create(name, p, compile=compiled)
            return built[str(compiled)]

        return factory

    factories = {"eager": build(False), "compiled": build(True), ANCHOR: _fused_adamw, "copy_": lambda p: copier}
    timed = measure(model, factories, args.warmup, args.repeats)  # type: ignore[arg-type]
    fallback = getattr(built["True"], "compile_fallback", {})
    anchor = timed[ANCHOR]
    copy_rate = copier.nbytes / timed["copy_"]
    rate = traffic_bytes(model, built["True"]) / timed["compiled"]
    ratio = timed["compiled"] / anchor
    over = "" if ratio <= COMPILED_GOAL else " (over)"
    note = f" (ran eagerly: {fallback})" if fallback else ""
    return (
        f"| {name}{note} | {timed['eager'] * 1e3:.1f} | {timed['compiled'] * 1e3:.1f} | {anchor * 1e3:.1f} "
        f"| {timed['eager'] / anchor:.2f} | {ratio:.2f}{over} | {rate / 1e9:.2f} | {copy_rate / 1e9:.2f} "
        f"| {100 * rate / copy_rate:.0f}% |"
    )


def run_compiled(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    lines = [
        f"Compiled chains: optimizer step on {args.depth} x Linear({args.width}, {args.width}) (with biases), torch "
        f"{torch.__version__}, {args.threads} thread(s), median of {args.repeats} steps after {args.warmup} warmup "
        f"steps (the first compiles). Steps of eager, compiled, {ANCHOR} and a copy_ of the parameters alternate.",
        "",
        "| recipe | eager ms | compiled ms | fused AdamW ms | eager / fused | compiled / fused (goal <= "
        f"{COMPILED_GOAL}) | compiled traffic GB/s | copy_ GB/s | compiled % of copy_ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ELEMENTWISE:
        if args.only and name not in args.only:
            continue
        lines.append(compiled_row(name, args))
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    lines = [
        f"Optimizer step on {args.depth} x Linear({args.width}, {args.width}), torch {torch.__version__}, "
        f"{args.threads} thread(s), median of {args.repeats} steps (Muon: 5) after {args.warmup} warmup steps "
        "(steps of ours, the baselines and a copy_ of the parameters alternate).",
        "",
        "| ours | baseline | baseline ms | ratio | goal | ours ms | ours / fused AdamW | ours traffic GB/s "
        "| copy_ GB/s | % of copy_ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = set(optimizer_names())
    for row in _rows():
        if row.ours not in names or (args.only and row.ours not in args.only):
            continue
        lines.append(bench_row(row, args))
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=None, help="registered names of the rows to run")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    parser.add_argument("--compiled", action="store_true", help="eager vs compiled recipes vs fused AdamW")
    args = parser.parse_args()
    table = run_compiled(args) if args.compiled else run(args)
    publish(table, args.out)


if __name__ == "__main__":
    main()
