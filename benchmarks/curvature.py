"""Cost of curvature: one HVP vs one gradient, second-order step times vs AdamW, and AdaHessian vs
``pytorch_optimizer.AdaHessian``, each measured as a ratio against a baseline in the same process.

- HVP/gradient: ``loss.backward()`` vs `trainlab.curvature.hvp` (forward, gradient with its graph, one
  more backward) on a training batch of ``digits-mlp`` and ``pylm``.
- Step time: the whole ``optimizer.step(closure)`` (forward and backward included, since AdaHessian's
  extra work is its second backward) for adamw, sgd, adahessian, mfac, mkor; ratio to AdamW.
- AdaHessian vs the ``pytorch-optimizer`` package (4.1.0), whose closure must call
  ``loss.backward(create_graph=True)`` itself (and, for ``pylm``, select the math attention kernel,
  or the second backward fails); its estimator is the signed ``z ⊙ Hz`` without spatial averaging,
  ours the official ``|Hz|``.

    python benchmarks/curvature.py --threads 1 --out benchmarks/results/curvature.md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from report import interleaved_medians, publish  # benchmarks/report.py (the script directory is on sys.path)
from torch import nn

from trainlab.curvature import hvp, twice_differentiable
from trainlab.lab.workloads import get_workload
from trainlab.optim import create
from trainlab.optim.accounting import state_bytes
from trainlab.runtime import batch_generator

WORKLOADS = ("digits-mlp", "pylm")
ALGORITHMS = ("adamw", "sgd", "adahessian", "mfac", "mkor")


def setup(workload_name: str) -> tuple[nn.Module, Callable[[], torch.Tensor], object]:
    workload = get_workload(workload_name)
    torch.manual_seed(0)
    model = workload.make_model()
    batch = workload.make_batch(workload.batch_size, batch_generator(0, 0))
    return model, lambda: workload.loss(model, batch), workload


def hvp_vs_gradient(workload_name: str, warmup: int, repeats: int) -> dict[str, object]:
    model, loss_fn, _ = setup(workload_name)
    params = [p for p in model.parameters() if p.requires_grad]
    vectors = [torch.randn_like(p) for p in params]

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn().backward()

    seconds = interleaved_medians({"grad": gradient, "hvp": lambda: hvp(loss_fn, params, vectors)}, warmup, repeats)
    grad_s, hvp_s = seconds["grad"], seconds["hvp"]
    return {
        "workload": workload_name,
        "gradient ms": grad_s * 1e3,
        "hvp ms": hvp_s * 1e3,
        "hvp / gradient": hvp_s / grad_s,
    }


def closure_for(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], create_graph: bool = False):
    """The standard closure; ``create_graph`` (with the math attention kernel) for optimizers that need the
    user to keep the graph."""

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with twice_differentiable() if create_graph else contextlib.nullcontext():
            loss = loss_fn()
            loss.backward(create_graph=create_graph)
        return loss

    return closure


def step_times(workload_name: str, hp: dict[str, dict], warmup: int, repeats: int) -> list[dict[str, object]]:
    steps, rows = {}, []
    for algorithm in ALGORITHMS:
        model, loss_fn, _ = setup(workload_name)
        opt = create(algorithm, model.named_parameters(), **hp.get(algorithm, {}))
        steps[algorithm] = functools.partial(opt.step, closure_for(opt, loss_fn))
        n_params = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append(
            {
                "workload": workload_name,
                "algorithm": algorithm,
                "opt": opt,
                "hyperparameters": hp.get(algorithm, {}),
                "params bytes": n_params,
            }
        )
    seconds = interleaved_medians(steps, warmup, repeats)
    out = []
    for r in rows:
        out.append(
            {
                "workload": r["workload"],
                "algorithm": r["algorithm"],
                "step ms": seconds[r["algorithm"]] * 1e3,
                "step / adamw": seconds[r["algorithm"]] / seconds["adamw"],
                "state / params (bytes)": state_bytes(r["opt"]) / r["params bytes"],
                "hyperparameters": r["hyperparameters"],
            }
        )
    return out


def versus_pytorch_optimizer(workload_name: str, warmup: int, repeats: int) -> list[dict[str, object]]:
    try:
        from pytorch_optimizer import AdaHessian as PackageAdaHessian
    except ImportError:
        return []
    model, loss_fn, _ = setup(workload_name)
    ours = create("adahessian", model.parameters(), seed=0)
    twin, twin_loss_fn, _ = setup(workload_name)
    theirs = PackageAdaHessian(twin.parameters(), lr=0.15, weight_decay=5e-4 / 0.15, eps=1e-4)
    steps = {
        "trainlab adahessian": functools.partial(ours.step, closure_for(ours, loss_fn)),
        "pytorch_optimizer.AdaHessian": functools.partial(
            theirs.step, closure_for(theirs, twin_loss_fn, create_graph=True)
        ),
    }
    seconds = interleaved_medians(steps, warmup, repeats)
    base = seconds["pytorch_optimizer.AdaHessian"]
    return [
        {"workload": workload_name, "optimizer": k, "step ms": v * 1e3, "ratio to package": v / base}
        for k, v in seconds.items()
    ]


def table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "(skipped: pytorch_optimizer is not installed)\n"
    keys = list(rows[0])

    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# digits-mlp: tuned in trainlab/claims/curvature.py. pylm: M-FAC's window is ngrads x the model
# (0.8M parameters here), so ngrads 32 keeps it at ~100 MB; nothing else was tuned for pylm.
HYPERPARAMETERS = {
    "digits-mlp": {
        "adamw": {"lr": 3e-3},
        "sgd": {"lr": 0.1, "nesterov": True},
        "adahessian": {"seed": 0},
        "mfac": {"ngrads": 128, "damp": 1e-2, "lr": 1e-2},
    },
    "pylm": {"adamw": {"lr": 3e-3}, "adahessian": {"seed": 0}, "mfac": {"ngrads": 32, "damp": 1e-2, "lr": 1e-3}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [w for w in args.workloads.split(",") if w]
    parts = [f"# Curvature benchmark (torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats})\n"]
    parts += ["## One HVP vs one gradient\n", table([hvp_vs_gradient(w, args.warmup, args.repeats) for w in names])]
    parts.append("## Step time (closure included) relative to AdamW\n")
    for w in names:
        parts.append(table(step_times(w, HYPERPARAMETERS.get(w, {}), args.warmup, args.repeats)))
    parts.append("## AdaHessian vs pytorch_optimizer.AdaHessian\n")
    parts.append(table([r for w in names for r in versus_pytorch_optimizer(w, args.warmup, args.repeats)]))
    text = "\n".join(parts)
    publish(text, args.out)


if __name__ == "__main__":
    main()
