"""Claims of structured sparsity: Progressive Gradient Flow against SR-STE at high N:M sparsity; structured (channel)
pruning whose export physically slices the layers (smaller file, faster forward); PreCropping against the SynFlow
mask it is derived from. Measured numbers: docs/structured_numbers.md."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.compress.masks import apply_mask
from trainlab.compress.sparse_training import NMSchedule, NMStepper, finalize, sparsify_linears
from trainlab.compress.structured import (
    parameter_count,
    precrop_widths,
    save_structured,
    slice_channels,
    structured_prune,
    synflow_masks,
)
from trainlab.lab.bench import resolve_hyperparameters
from trainlab.lab.compression import calibration_inputs
from trainlab.lab.runner import train
from trainlab.lab.workloads import get_workload
from trainlab.optim import create

PGF = "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers"
BETA_RANK = "Beta-Rank: A Robust Convolutional Filter Pruning Method For Imbalanced Medical Image Analysis"
PRECROP = "Structured Pruning is All You Need for Pruning CNNs at Initialization"

# PGF check: digits-mlp, both hidden Linears N:M (the head stays dense), the workload's 400 AdamW steps, 5 seeds.
PGF_SEEDS = (0, 1, 2, 3, 4)
PGF_STEPS = 400
PGF_FINE_TUNE = PGF_STEPS // 5  # hard mask (STE) in the last 20% of training, as in the official phases
# MDGF-exp: alpha_t = exp(-c t). The official per-step default c = 2e-4 is sized for runs of 10^5+ steps; at 400
# steps it would leave alpha ~ 0.94 when the hard mask starts, so c is scaled to the run: alpha reaches exp(-10)
# at the end of the decay phase (the spec's prototype). The official c is measured as well and reported.
PGF_DECAY_COEF = 10.0 / (PGF_STEPS - PGF_FINE_TUNE)
OFFICIAL_DECAY_COEF = 2e-4

# PreCropping check: digits-cnn at init, 90% of the weights removed, trained from scratch for the workload's steps.
PRECROP_SPARSITY = 0.9
PRECROP_SEEDS = (0, 1, 2)
PRECROP_TOLERANCE = 0.005  # "without sacrificing accuracy": within half a point (~2 of 360 validation digits)

# Structured export check: digits-cnn, half of every prunable layer's channels removed by Beta-Rank.
EXPORT_SPARSITY = 0.5
TIMING_REPEATS = 20


def _nm_accuracy(schedule: NMSchedule, seed: int) -> float:
    """digits-mlp trained from scratch with ``schedule`` on its hidden Linears; accuracy of the hard-masked net."""
    w = get_workload("digits-mlp")
    hp = resolve_hyperparameters("adamw", w, None)
    box: list[nn.Module] = []

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        sparsify_linears(model, schedule)  # shares the Parameters, so the optimizer trains the dense weights
        box.append(model)
        return create("adamw", model.named_parameters(), **hp)

    train(
        w, make_optimizer, seed=seed, steps=PGF_STEPS, eval_every=PGF_STEPS, make_scheduler=lambda o: NMStepper(box[0])
    )
    model = box[0]
    finalize(model)  # plain Linears with the target N:M mask: what is evaluated is truly N:M sparse
    return w.evaluate(model)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values)


@register_claim(
    "pgf-beats-srste-high-nm",
    method="mdgf",
    paper=PGF,
    fast=False,
    promise="Progressive Gradient Flow (MDGF, exponential mask decay) trains N:M sparse networks to higher accuracy "
    "than SR-STE at high sparsity (1:8 or 1:16)",
)
def pgf_beats_srste() -> ClaimResult:
    torch.set_num_threads(1)
    measured: dict[str, object] = {}
    baseline: dict[str, object] = {}
    wins = []
    for n, m in ((1, 8), (1, 16)):
        mdgf = dict(total_steps=PGF_STEPS, fine_tune_steps=PGF_FINE_TUNE, decay="exp")
        runs = {
            "mdgf-exp": NMSchedule(n, m, "mdgf", decay_coef=PGF_DECAY_COEF, **mdgf),
            "mdgf-exp official c": NMSchedule(n, m, "mdgf", decay_coef=OFFICIAL_DECAY_COEF, **mdgf),
            "sr-ste": NMSchedule(n, m, "sr-ste"),
            "ste": NMSchedule(n, m, "ste"),  # reference: MDGF's hard-mask phase is plain STE (official StepDecay)
        }
        acc = {name: [_nm_accuracy(s, seed) for seed in PGF_SEEDS] for name, s in runs.items()}
        for name, values in acc.items():
            mean, sd = _mean_sd(values)
            out = measured if name.startswith("mdgf") else baseline
            out[f"{n}:{m} {name} acc"] = f"{mean:.4f} ± {sd:.4f}"
            out[f"{n}:{m} {name} per seed"] = [round(a, 4) for a in values]
        diff = [p - b for p, b in zip(acc["mdgf-exp"], acc["sr-ste"], strict=True)]  # paired: same seeds
        mean, sd = _mean_sd(diff)
        measured[f"{n}:{m} mdgf-exp - sr-ste (paired mean ± s.e.)"] = f"{mean:+.4f} ± {sd / len(diff) ** 0.5:.4f}"
        wins.append(mean > 0)
    return ClaimResult(
        measured,
        baseline,
        any(wins),
        note=f"digits-mlp, both hidden Linears N:M (head dense), {PGF_STEPS} AdamW steps (workload-tuned), seeds "
        f"{list(PGF_SEEDS)}; MDGF-exp alpha_t = exp(-c t), c = 10/{PGF_STEPS - PGF_FINE_TUNE} (scaled to the run; the "
        f"official c = 2e-4 reported too), hard mask in the last {PGF_FINE_TUNE} steps; SR-STE lambda = 2e-4; "
        "accuracy (mean ± sd over seeds) of the finalized hard N:M model on the 360 validation digits; pass: MDGF-exp "
        "mean > SR-STE mean at 1:8 or at 1:16 (the issue's wording; the paired difference and its standard error "
        "say whether a win is beyond seed noise)",
    )


def _forward_seconds(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward time of each model on ``x``, the models interleaved so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            model(x)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@register_claim(
    "structured-export-smaller-faster-cnn",
    method="beta-rank",
    paper=BETA_RANK,
    fast=True,
    promise="Filter pruning exported by physically slicing the layers (and the next layers' inputs) gives a file "
    "smaller by at least the pruned fraction and a faster forward pass than the dense digits-cnn",
)
def structured_export_smaller_faster() -> ClaimResult:
    torch.set_num_threads(1)
    w = get_workload("digits-cnn")
    torch.manual_seed(0)
    dense = w.make_model()  # size and speed depend on the widths only, so the claim needs no training
    pruned = structured_prune(dense, "beta-rank", EXPORT_SPARSITY, calibration_inputs(w, 2))
    with tempfile.TemporaryDirectory() as tmp:
        save_structured(dense, Path(tmp) / "dense.safetensors")
        save_structured(pruned, Path(tmp) / "sliced.safetensors")
        dense_bytes = (Path(tmp) / "dense.safetensors").stat().st_size
        sliced_bytes = (Path(tmp) / "sliced.safetensors").stat().st_size
    x = _validation_inputs()
    seconds = _forward_seconds({"dense": copy.deepcopy(dense), "sliced": pruned}, x, TIMING_REPEATS)
    file_ratio = sliced_bytes / dense_bytes
    speedup = seconds["dense"] / seconds["sliced"]
    widths = [m.weight.shape[0] for m in pruned if isinstance(m, nn.Conv2d)]
    return ClaimResult(
        {
            "sliced file bytes": sliced_bytes,
            "file ratio": round(file_ratio, 4),
            "sliced params": parameter_count(pruned),
            "sliced forward ms": round(seconds["sliced"] * 1e3, 3),
            "speedup (dense/sliced time)": round(speedup, 2),
            "conv widths": widths,
        },
        {
            "dense file bytes": dense_bytes,
            "dense params": parameter_count(dense),
            "dense forward ms": round(seconds["dense"] * 1e3, 3),
            "pruned channel fraction": EXPORT_SPARSITY,
        },
        file_ratio <= 1 - EXPORT_SPARSITY and speedup > 1.0,
        note=f"digits-cnn at init (seed 0), Beta-Rank on 2 calibration batches, {EXPORT_SPARSITY:.0%} of each conv's "
        f"filters removed (the head keeps its 10 outputs, loses inputs); safetensors files; forward = the "
        f"{len(x)} validation digits, 1 thread, median of {TIMING_REPEATS} interleaved repeats",
    )


def _validation_inputs() -> torch.Tensor:
    from trainlab.lab.workloads.digits import digits_data

    return digits_data()[2]


def _synflow_weight_count(model: nn.Module, masks: dict[int, torch.Tensor]) -> int:
    """Parameters of ``model`` once ``masks`` zero its weights (biases and other tensors counted in full)."""
    return parameter_count(model) - sum(int((~m).sum()) for m in masks.values())


@register_claim(
    "precrop-matches-synflow-cnn",
    method="precrop",
    paper=PRECROP,
    fast=False,
    promise="PreCropping (channel widths from SynFlow's layer-wise densities, a dense narrower CNN trained from "
    "scratch) matches the accuracy of the SynFlow weight mask it is derived from",
)
def precrop_matches_synflow() -> ClaimResult:
    torch.set_num_threads(1)
    w = get_workload("digits-cnn")
    hp = resolve_hyperparameters("adamw", w, None)
    example = calibration_inputs(w, 1)[0]
    acc: dict[str, list[float]] = {"precrop": [], "synflow mask": []}
    params: dict[str, int] = {}
    conv_widths: list[list[int]] = []
    for seed in PRECROP_SEEDS:
        torch.manual_seed(seed)
        widths = precrop_widths(w.make_model(), PRECROP_SPARSITY, example)
        conv_widths.append(list(widths.values()))

        def narrow(
            widths: dict[int, int] = widths,
        ) -> nn.Module:  # the runner seeds torch before calling it: a fresh init of the narrow net
            model = slice_channels(w.make_model(), {i: torch.arange(c) for i, c in widths.items()})
            for mod in model:
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()  # default init at the narrow fan-in, as a net built at that width
            return model

        r = train(
            dataclasses.replace(w, make_model=narrow), lambda m: create("adamw", m.named_parameters(), **hp), seed=seed
        )
        acc["precrop"].append(r.final_metric)
        params[f"precrop seed {seed}"] = parameter_count(r.model)

        def masked_optimizer(model: nn.Module, seed: int = seed) -> torch.optim.Optimizer:
            masks = synflow_masks(model, 1.0 - PRECROP_SPARSITY, example)  # on this run's own initial weights
            for i, mask in masks.items():
                apply_mask(model[i], mask)  # pruned weights stay exactly zero through training
            params[f"synflow mask seed {seed}"] = _synflow_weight_count(model, masks)
            return create("adamw", model.named_parameters(), **hp)

        acc["synflow mask"].append(train(w, masked_optimizer, seed=seed).final_metric)
    mean = {k: statistics.fmean(v) for k, v in acc.items()}
    torch.manual_seed(0)
    dense_params = parameter_count(w.make_model())
    return ClaimResult(
        {
            "precrop acc": round(mean["precrop"], 4),
            "precrop per seed": [round(a, 4) for a in acc["precrop"]],
            "precrop params": [v for k, v in params.items() if k.startswith("precrop")],
            "precrop conv widths per seed": conv_widths,
        },
        {
            "synflow mask acc": round(mean["synflow mask"], 4),
            "synflow per seed": [round(a, 4) for a in acc["synflow mask"]],
            "synflow nonzero params": [v for k, v in params.items() if k.startswith("synflow")],
            "dense params": dense_params,
        },
        mean["precrop"] >= mean["synflow mask"] - PRECROP_TOLERANCE,
        note=f"digits-cnn, {PRECROP_SPARSITY:.0%} weight sparsity by iterative SynFlow (100 rounds) at init; PreCrop "
        "widths a_l = min(1, d_l / a_(l-1)) for the convs (the head keeps 10 outputs), fresh default init; both "
        f"trained {w.steps} AdamW steps (workload-tuned), seeds {list(PRECROP_SEEDS)}; pass: PreCrop mean accuracy "
        f">= SynFlow-mask mean - {PRECROP_TOLERANCE}",
    )
