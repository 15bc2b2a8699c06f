"""Claims of the adapter methods: LoRA-GA's speed-up, AdaLoRA's rank allocation, every adapter against full
fine-tuning, and WeLore's non-uniform compression, on the digits-shifted workload or a generated task."""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from torch import nn

import trainlab.adapters as adapters
from trainlab.adapters.adalora import ADALORA_PAPER
from trainlab.adapters.lora_ga import LORA_GA_PAPER
from trainlab.adapters.welore import WELORE_PAPER
from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.lab.finetune import finetune
from trainlab.lab.workloads import get_workload
from trainlab.lab.workloads.digits import digits_data
from trainlab.lab.workloads.finetuning import pretrained_digits_mlp
from trainlab.optim import create
from trainlab.runtime import evaluating

SEEDS = (0, 1, 2)
TUNING_SEEDS = (10, 11)  # hyperparameters are chosen on these, results reported on SEEDS


def _steps_to_reach(curve: list[dict[str, float]], level: float) -> int | None:
    """First evaluation step whose window-mean training loss is at or below ``level``."""
    return next((int(p["step"]) for p in curve if p["train_loss"] <= level), None)


def _lora_ga_half_steps(workload: str, seeds: tuple[int, ...], hp: dict[str, Any]) -> ClaimResult:
    w = get_workload(workload)
    ratios, lora_final, ga_final = [], [], []
    for seed in seeds:
        lora = finetune(w, "lora", seed=seed, hyperparameters=hp)
        ga = finetune(w, "lora-ga", seed=seed, hyperparameters=hp)
        level = lora.run.curve[-1]["train_loss"]
        reached = _steps_to_reach(ga.run.curve, level)
        ratios.append(float("inf") if reached is None else reached / w.steps)
        lora_final.append(level)
        ga_final.append(ga.run.curve[-1]["train_loss"])
    return ClaimResult(
        measured={"lora-ga steps / lora steps (per seed)": ratios, "lora-ga final train loss": ga_final},
        baseline={"lora final train loss": lora_final, "lora steps": w.steps},
        passed=all(r <= 0.5 for r in ratios),
        note=f"{w.description}; adapters on the workload's default layers, r 8, α 16, AdamW {hp or 'as tuned'}, "
        f"batch {w.batch_size}, {w.steps} steps, seeds {seeds}; loss = mean training loss over each "
        f"{w.eval_every}-step window; LoRA-GA prepared on 64 batches of 2 (official bsz/iters); init as the official "
        "code (A = Vᵀ[:r], B = U[:, r:2r] of the mean gradient's SVD, both x m^¼/√γ, γ 16). Pass: every seed at "
        "or below 0.5. On digits-shifted seed 0 sits at the bound: with another draw of LoRA's random A (before "
        "2026-12-07 the draw depended on what the process had run before) it was 0.53, and at LoRA's tuned lr 1e-2 "
        "the ratios are 0.60 / 0.70 / 0.40",
    )


@register_claim(
    "lora-ga-half-steps/digits-shifted",
    method="lora-ga",
    paper=LORA_GA_PAPER,
    promise="LoRA-GA reaches LoRA's final training loss in at most half of LoRA's steps (r 8, α 16, same AdamW)",
    fast=False,
)
def lora_ga_half_steps() -> ClaimResult:
    return _lora_ga_half_steps("digits-shifted", SEEDS, {})


@register_claim(
    "lora-ga-half-steps/pylm-heldout",
    method="lora-ga",
    paper=LORA_GA_PAPER,
    promise="on pylm pretrained then adapted to held-out files, LoRA-GA reaches LoRA's final training loss in at "
    "most half of LoRA's steps (r 8, α 16, same AdamW)",
    fast=False,
)
def lora_ga_half_steps_pylm() -> ClaimResult:
    return _lora_ga_half_steps("pylm-heldout", (0,), {"lr": 1e-3})


# -- AdaLoRA: a generated task whose layers need different ranks ---------------------------------------------------
TRUE_RANKS = (0, 1, 4, 8)
WIDTH = 64
# The official README's schedule (AdaLoRA, QingruZhang/AdaLoRA): T 3000, t_i 500, t_f 1500, ΔT 10, β 0.85.
ADALORA_STEPS, ADALORA_SCHEDULE = 3000, {"init_warmup": 500, "final_warmup": 1500, "mask_interval": 10}
ADALORA_LRS = (1e-2, 3e-2)  # each method's Adam lr: the lower mean test MSE on the tuning seeds


class _SideBySide(nn.Module):
    """Frozen layers side by side, each on its own slice of the input: layer k's error is its own, so a layer that
    needs rank 8 cannot borrow another layer's rank (in a stack of linear layers any layer's update can absorb
    another's, to first order, and the per-layer ranks stop mattering)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [layer(part) for layer, part in zip(self.layers, x.chunk(len(self.layers), -1), strict=True)], -1
        )


def _heterogeneous_task(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(frozen base, teacher): 4 orthogonal 64x64 layers side by side; the teacher adds a rank-k ΔW to layer k."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(WIDTH, WIDTH, bias=False) for _ in TRUE_RANKS]
    teacher = copy.deepcopy(layers)
    with torch.no_grad():
        for b, t, rank in zip(layers, teacher, TRUE_RANKS, strict=True):
            q, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=g))
            b.weight.copy_(q)
            delta = torch.randn(WIDTH, rank, generator=g) @ torch.randn(rank, WIDTH, generator=g) / WIDTH
            t.weight.copy_(q + 0.5 * delta)
    n = WIDTH * len(TRUE_RANKS)
    x_train = torch.randn(4096, n, generator=g)
    x_test = torch.randn(1024, n, generator=g)
    return _SideBySide(layers), _SideBySide(teacher), x_train, x_test


def _fit(model: nn.Module, teacher: nn.Module, x: torch.Tensor, steps: int, lr: float, **callback: Any):
    opt = create("torch-adamw", adapters.trainable_parameters(model), lr=lr, weight_decay=0.0)
    cb = adapters.training_callback(model, **callback)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        targets = teacher(x)
    for step in range(1, steps + 1):
        index = torch.randint(len(x), (256,), generator=g)
        opt.zero_grad()
        loss = (model(x[index]) - targets[index]).pow(2).mean() + cb.regularizer()
        loss.backward()
        opt.step()
        cb.step(step)
    return cb


@register_claim(
    "adalora-heterogeneous-ranks",
    method="adalora",
    paper=ADALORA_PAPER,
    promise="at an equal final rank budget, AdaLoRA fits a task whose layers need ranks (0, 1, 4, 8) better than "
    "uniform-rank LoRA, and gives more rank to the layers that need it",
    fast=False,
)
def adalora_heterogeneous_ranks() -> ClaimResult:
    def run(method: str, seed: int, lr: float) -> tuple[float, list[int]]:
        torch.manual_seed(seed)
        base, teacher, x_train, x_test = _heterogeneous_task(seed)
        if method == "lora":
            model = adapters.attach(base, "lora", targets=[nn.Linear], r=3, alpha=3.0)
            cb = _fit(model, teacher, x_train, ADALORA_STEPS, lr)
        else:
            model = adapters.attach(base, "adalora", targets=[nn.Linear], r=6, alpha=6.0)
            cb = _fit(model, teacher, x_train, ADALORA_STEPS, lr, total_steps=ADALORA_STEPS, target_rank=3,
                      **ADALORA_SCHEDULE)  # fmt: skip
        with evaluating(model):
            mse = (model(x_test) - teacher(x_test)).pow(2).mean().item()
        return mse, list(cb.ranks().values()) if method == "adalora" else [3] * len(TRUE_RANKS)

    lrs = {
        m: min(ADALORA_LRS, key=lambda lr, m=m: statistics.mean(run(m, s, lr)[0] for s in TUNING_SEEDS))
        for m in ("lora", "adalora")
    }
    lora = [run("lora", s, lrs["lora"])[0] for s in SEEDS]
    ada = [run("adalora", s, lrs["adalora"]) for s in SEEDS]
    mse_ada, all_ranks = [m for m, _ in ada], [r for _, r in ada]
    return ClaimResult(
        measured={"adalora test mse": mse_ada, "adalora final ranks": all_ranks, "adalora lr": lrs["adalora"]},
        baseline={"lora test mse": lora, "lora ranks": [3] * 4, "lora lr": lrs["lora"]},
        passed=all(a < b for a, b in zip(mse_ada, lora, strict=True))
        and all(sum(r) <= 12 and r[3] >= r[0] for r in all_ranks),
        note=f"seeds {SEEDS}; 4 frozen orthogonal 64x64 layers side by side (each on its own quarter of a 256-d "
        "input, so each layer's error is its own), teacher adds 0.5 x rank (0, 1, 4, 8) updates; MSE regression on "
        f"4096 Gaussian inputs, Adam, batch 256, {ADALORA_STEPS} steps; LoRA r 3 everywhere (12) vs AdaLoRA r 6 "
        "pruned to 12 in total on the official README schedule (t_i 500, t_f 1500, ΔT 10, β 0.85, orth 0.1); "
        f"α = r for both (scale 1); each method's lr from {ADALORA_LRS}, the lower mean test MSE on the tuning seeds "
        f"{TUNING_SEEDS} (AdaLoRA's paper tunes its lr per task). Pass: AdaLoRA below LoRA on every seed, total rank "
        "<= 12, layer 4 (rank 8) keeps at least layer 1's (rank 0) rank. (Before 2026-12-07 the layers were "
        "stacked, where any layer can absorb another's update, with one lr 1e-2 and 600 steps: LoRA won, 0.93e-3 "
        "vs 1.23e-3. On this task the result depends on the init draw: with AdaLoRA's init drawn right after "
        "LoRA's from one stream, seed 2 gave 4.0e-3 vs LoRA's 3.6e-3.)",
    )


# -- every method against full fine-tuning ---------------------------------------------------------------------------
FULL_FT_GAP = 0.05  # accuracy points, stated before measuring
# Paper defaults, except where the toy network forces a choice: SaRA's τ = 2e-3 is an absolute threshold set for
# diffusion models, so the paper's "smallest 10-20%" is taken as fraction 0.15; AdaLoRA's and SNELL's schedules
# are scaled to the run (the official warmups are longer than the whole run); S2FT's ratio 0.013 is the authors'
# LLaMA-7B FFN share (143 of 11008 channels), 2 of 128 channels here: 0.15 (19 channels, 3648 parameters) matches
# LoRA r 8's 3584, as S2FT's comparisons with LoRA and the spec's check do.
ADAPTER_RUNS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "lora": ({}, {}),
    "lora-ga": ({}, {}),
    "adalora": ({}, {"init_warmup": 50, "final_warmup": 100, "mask_interval": 10}),
    "bone": ({}, {}),
    "hut": ({}, {}),
    "s2ft": ({"couple": "1>3", "ratio": 0.15}, {}),  # the paper's FFN coupling: rows of layer 1, columns of layer 3
    "sara": ({"fraction": 0.15}, {"progressive_iter": 150, "min_dim": 0}),
    "snell": ({}, {}),
    "welore": ({}, {}),
}
# Every method (full fine-tuning too) gets its own AdamW learning rate, the best mean accuracy on the tuning seeds
# over this grid: the papers train adapters at larger rates than full fine-tuning (LoRA, AdaLoRA, S2FT ~10x).
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)


def _tuned_lr(w: Any, method: str | None, config: dict[str, Any], callback: dict[str, Any]) -> tuple[float, dict]:
    scores = {
        lr: statistics.mean(
            finetune(w, method, config=config, callback=callback, seed=s, hyperparameters={"lr": lr}).final_metric
            for s in TUNING_SEEDS
        )
        for lr in LR_GRID
    }
    return max(scores, key=scores.get), scores


@register_claim(
    "adapters-vs-full-finetuning/digits-shifted",
    method="lora",
    paper="each adapter's paper (see the adapters table)",
    promise=f"every adapter method comes within {FULL_FT_GAP} validation accuracy (absolute) of full fine-tuning on "
    "digits-shifted, at a fraction of its trainable parameters",
    fast=False,
)
def adapters_vs_full_finetuning() -> ClaimResult:
    w = get_workload("digits-shifted")
    full_lr, _ = _tuned_lr(w, None, {}, {})
    full = [finetune(w, None, seed=s, hyperparameters={"lr": full_lr}) for s in SEEDS]
    full_acc = statistics.mean(r.final_metric for r in full)
    measured, gaps = {}, {}
    for method, (config, callback) in ADAPTER_RUNS.items():
        lr, _ = _tuned_lr(w, method, config, callback)
        runs = [
            finetune(w, method, config=config, callback=callback, seed=s, hyperparameters={"lr": lr}) for s in SEEDS
        ]
        acc = statistics.mean(r.final_metric for r in runs)
        gaps[method] = full_acc - acc
        measured[method] = {
            "accuracy": round(acc, 4),
            "gap": round(gaps[method], 4),
            "lr": lr,
            "trainable": runs[0].trainable,
        }
    return ClaimResult(
        measured=measured,
        baseline={
            "full fine-tuning accuracy": round(full_acc, 4),
            "lr": full_lr,
            "trainable": full[0].trainable,
            "unadapted accuracy": round(w.evaluate(w.make_model()), 4),
        },
        passed=all(g <= FULL_FT_GAP for g in gaps.values()),
        note=f"mean over seeds {SEEDS}; AdamW, batch 64, {w.steps} steps, each method (and full fine-tuning) at its "
        f"own lr: the best mean accuracy over {LR_GRID} on the tuning seeds {TUNING_SEEDS} (not the reported ones); "
        "adapters on the two hidden layers with paper defaults (SaRA: smallest 15%; AdaLoRA/SNELL schedules scaled "
        "to the run; S2FT: 15% of the channels, LoRA r 8's parameter count). At one shared lr 3e-3 (before "
        "2026-12-07) s2ft, sara, snell, hut and adalora were outside the gap. "
        f"Failing methods: {[m for m, g in gaps.items() if g > FULL_FT_GAP] or 'none'}",
    )


# -- WeLore against uniform-rank SVD -----------------------------------------------------------------------------
def _uniform_svd(model: nn.Module, keep: float) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Linear):
                u, s, vh = torch.linalg.svd(m.weight, full_matrices=False)
                k = max(1, round(keep * len(s)))
                m.weight.copy_(u[:, :k] * s[:k] @ vh[:k])
    return out


@register_claim(
    "welore-vs-uniform-svd/digits",
    method="welore",
    paper=WELORE_PAPER,
    promise="removing half of the total rank with WeLore's global normalized-spectrum threshold keeps the pretrained "
    "digits MLP's accuracy better than removing half of every layer's rank",
    fast=False,
)
def welore_vs_uniform() -> ClaimResult:
    model = pretrained_digits_mlp()
    _, _, x_val, y_val = digits_data()
    welore = adapters.attach(model, "welore", targets=[nn.Linear], reduction=0.5)
    uniform = _uniform_svd(model, 0.5)

    def accuracy(m: nn.Module) -> float:
        with evaluating(m):
            return (m(x_val).argmax(-1) == y_val).float().mean().item()

    ranks = {n: layer.layer_kwargs()["rank"] for n, layer in adapters.adapter_layers(welore).items()}
    full_ranks = {n: min(model.get_submodule(n).weight.shape) for n in ranks}
    acc_w, acc_u = accuracy(welore), accuracy(uniform)
    return ClaimResult(
        measured={"welore accuracy": round(acc_w, 4), "welore ranks": ranks},
        baseline={"uniform accuracy": round(acc_u, 4), "full ranks": full_ranks, "dense accuracy": accuracy(model)},
        passed=acc_w > acc_u,
        note="digits MLP (pretrained, 0.97), all three Linear layers; WeLore θ by bisection to remove 50% of the total "
        "rank; uniform keeps round(0.5 x min(out, in)) per layer; no fine-tuning after compression",
    )
