"""trainlab adapters against PEFT where PEFT has the same method: LoRA, AdaLoRA (SVD form, no rank allocation
during the timed steps), Bone = PEFT MiSS ``init_weights="bat"``, and LoRA-GA's init.

For each method both libraries wrap the same float32 MLP (4 x Linear(width, width) with ReLU); PEFT's adapter
tensors are set to trainlab's, so the outputs at init must agree; both then take the same ``steps`` AdamW steps
(torch.optim.AdamW, foreach) on the same MSE batches and their outputs must still agree. LoRA-GA: PEFT's port
scales B by the singular values (the authors' code does not), so PEFT gets trainlab's A, B and the paper's way of
applying the offset, ``W0 - (α/r) B0 A0`` written into its base weight, which checks that trainlab's frozen-buffer
offset is the same function. Reported: max |Δ output| at init and after training, median step time (forward,
backward, AdamW) over interleaved repeats and the bytes autograd saves for backward in one step (activation
memory), each as trainlab / PEFT.

    python benchmarks/adapters.py --threads 1 --out benchmarks/results/adapters.md
"""

from __future__ import annotations

import argparse
import copy

import peft
import torch
from report import interleaved_medians, publish  # benchmarks/report.py (the script directory is on sys.path)
from torch import nn

import trainlab.adapters as adapters

NAMES = ["0", "2", "4", "6"]


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in NAMES:
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def pair(method: str, base: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module, list, list]:
    """(ours, theirs, our params, their params) with identical adapter tensors, params in matching order."""
    if method == "lora":
        ours = adapters.attach(base, "lora", targets=NAMES, r=8, alpha=16.0)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=NAMES))
        names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
    elif method == "adalora":
        ours = adapters.attach(base, "adalora", targets=NAMES, r=12, alpha=16.0)
        config = peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=NAMES, total_step=1000)
        theirs = peft.get_peft_model(copy.deepcopy(base), config)
        names = {"lora_A": "lora_A.default", "lora_E": "lora_E.default", "lora_B": "lora_B.default"}
    elif method == "bone":
        ours = adapters.attach(base, "bone", targets=NAMES, r=64)
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.MissConfig(r=64, init_weights="bat", target_modules=NAMES)
        )
        names = {"bone_block": "miss_block.default"}
    elif method == "lora-ga":
        ours = adapters.attach(base, "lora-ga", targets=NAMES, r=8, alpha=16.0)
        adapters.prepare(ours, [x[i : i + 2] for i in range(0, 128, 2)], loss=lambda m, b: m(b).pow(2).mean())
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=NAMES))
        names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
    else:
        raise ValueError(method)
    ours_p, theirs_p = [], []
    with torch.no_grad():
        for name in NAMES:
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            for ours_name, their_name in names.items():
                p, q = getattr(mine, ours_name), other.get_parameter(their_name)
                q.copy_(p.detach().reshape(q.shape))
                ours_p.append(p)
                theirs_p.append(q)
            if method == "lora-ga":  # the paper's offset: edit the base weight
                other.base_layer.weight -= mine.scaling * mine.init_B @ mine.init_A
    return ours, theirs, ours_p, theirs_p


def saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total


def agreement(method: str, width: int, batch: int, steps: int) -> tuple[float, float]:
    """Max |Δ output| at init and after ``steps`` identical AdamW steps, in float64 (Adam divides by √v, so in
    float32 rounding-level gradient differences on near-zero gradients grow to lr-sized steps)."""
    return run(method, width, batch, steps, 0, torch.float64)[:2]


def run(method: str, width: int, batch: int, steps: int, repeats: int, dtype: torch.dtype) -> tuple[float, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=g, dtype=dtype)
    y = torch.randn(batch, width, generator=g, dtype=dtype)
    ours, theirs, ours_p, theirs_p = pair(method, mlp(width).to(dtype), x)
    with torch.no_grad():
        init_gap = (ours(x) - theirs(x)).abs().max().item()
    opts = {
        "ours": (ours, torch.optim.AdamW(ours_p, lr=1e-3, foreach=True)),
        "theirs": (theirs, torch.optim.AdamW(theirs_p, lr=1e-3, foreach=True)),
    }

    def step(key: str) -> None:
        model, opt = opts[key]
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()

    for _ in range(steps):
        step("ours")
        step("theirs")
    with torch.no_grad():
        train_gap = (ours(x) - theirs(x)).abs().max().item()
    if repeats == 0:
        return init_gap, train_gap
    times = interleaved_medians({key: lambda key=key: step(key) for key in opts}, 0, repeats)
    memory = {k: saved_bytes(lambda m=m: (m(x) - y).pow(2).mean()) for k, (m, _) in opts.items()}
    return (
        init_gap,
        train_gap,
        1e3 * times["ours"],
        1e3 * times["theirs"],
        memory["ours"] / 2**20,
        memory["theirs"] / 2**20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        "# Adapters: trainlab vs PEFT",
        "",
        f"MLP 4 x Linear({args.width}, {args.width}), batch {args.batch}, AdamW lr 1e-3; output gaps in float64 "
        f"at init and after {args.steps} identical steps; float32 step time median of {args.repeats} interleaved "
        f"repeats, {torch.get_num_threads()} thread(s), peft {peft.__version__}, torch {torch.__version__}.",
        "",
        "| method | max Δ at init | max Δ after steps | step ms (ours / peft) | ratio | saved MiB (ours / peft) "
        "| ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("lora", "lora-ga", "adalora", "bone"):
        init_gap, train_gap = agreement(method, args.width, args.batch, args.steps)
        *_, ours_ms, peft_ms, ours_mib, peft_mib = run(
            method, args.width, args.batch, args.steps, args.repeats, torch.float32
        )
        lines.append(
            f"| {method} | {init_gap:.1e} | {train_gap:.1e} | {ours_ms:.2f} / {peft_ms:.2f} | {ours_ms / peft_ms:.2f} "
            f"| {ours_mib:.2f} / {peft_mib:.2f} | {ours_mib / peft_mib:.2f} |"
        )
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
