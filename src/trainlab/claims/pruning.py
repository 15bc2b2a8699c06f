"""Claims of the pruning methods: Global MP with MT, layer-adaptive RD pruning, EvoPress, PERP, N:M export,
gradual magnitude pruning. Dense models are the workloads' own, trained with their tuned AdamW (seed 0)."""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import torch
from torch import nn

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.compress import allocate_plan, compress
from trainlab.compress.calibrate import kl_to_dense, model_outputs
from trainlab.compress.export import load_compressed, save_compressed, save_dense
from trainlab.compress.masks import get_mask
from trainlab.compress.masks import sparsity as layer_sparsity
from trainlab.compress.plan import Plan, compressible_layers
from trainlab.compress.prune import GradualMagnitudePruner, is_nm
from trainlab.lab.bench import resolve_hyperparameters
from trainlab.lab.compression import calibration_inputs, recover_perp, retrain, trained_model
from trainlab.lab.runner import train
from trainlab.lab.workloads import get_workload
from trainlab.optim import create

GLOBAL_MP = "Is Complexity Required for Neural Network Pruning? A Case Study on Global Magnitude Pruning"
RD_PRUNE = "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"
EVOPRESS = "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search"
PERP = "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs"
NM = "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch (N:M sparsity)"
GRADUAL = "To prune, or not to prune: exploring the efficacy of pruning for model compression"

PERP_PRUNED = r"blocks\..*"  # pylm's transformer blocks
PERP_STEPS = 100
PERP_LR = 3e-3  # pylm's tuned AdamW lr


@functools.cache
def _dense(workload: str) -> nn.Module:
    torch.set_num_threads(1)
    return trained_model(get_workload(workload), seed=0)


def _pruned(workload: str, allocator: str, s: float, calibration: list[torch.Tensor] = (), **options: object):
    """A pruned copy of the workload's dense model and the weights each layer kept."""
    dense = _dense(workload)
    model = compress(dense, allocate_plan(allocator, dense, sparsity=s, calibration=calibration, **options)).model
    return model, {k: int(get_mask(m).sum()) for k, m in compressible_layers(model).items()}


def _calibration_kl(dense: nn.Module, pruned: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Mean KL(dense || pruned) over the calibration inputs."""
    pairs = zip(model_outputs(dense, inputs), model_outputs(pruned, inputs), strict=True)
    return sum(kl_to_dense(d, o).item() for d, o in pairs) / len(inputs)


@register_claim(
    "global-mp-beats-uniform-90",
    method="global",
    paper=GLOBAL_MP,
    fast=False,
    promise="One global magnitude threshold with a per-layer minimum (MT) beats uniform layer-wise magnitude "
    "pruning at equal kept weights and avoids layer collapse",
)
def global_mp_beats_uniform() -> ClaimResult:
    measured, baseline, passed = {}, {}, True
    for name in ("digits-mlp", "digits-cnn"):
        w = get_workload(name)
        for allocator, out in (("global", measured), ("uniform", baseline)):
            model, kept = _pruned(name, allocator, 0.9)
            out[f"{name} one-shot acc"] = round(w.evaluate(model), 4)
            retrain(model, w, model.parameters(), 100, 1e-3, seed=1)
            out[f"{name} +100 steps acc"] = round(w.evaluate(model), 4)
            out[f"{name} min layer density"] = round(
                min(
                    k / m.weight.numel()
                    for k, m in zip(kept.values(), compressible_layers(model).values(), strict=True)
                ),
                4,
            )
        passed = passed and measured[f"{name} +100 steps acc"] > baseline[f"{name} +100 steps acc"]
        passed = passed and measured[f"{name} min layer density"] > 0
    return ClaimResult(
        measured,
        baseline,
        passed,
        note="90% of Linear/Conv weights pruned, MT 0.05% of all weights, then 100 masked AdamW "
        "fine-tune steps (lr 1e-3, no weight decay); pass = higher fine-tuned accuracy on both "
        "workloads and no layer fully pruned; seed 0",
    )


@register_claim(
    "layer-adaptive-beats-uniform-90",
    method="layer-adaptive",
    paper=RD_PRUNE,
    fast=True,
    promise="Per-layer sparsities from output-distortion curves + DP (additivity) beat uniform pruning at equal "
    "sparsity without fine-tuning",
)
def layer_adaptive_beats_uniform() -> ClaimResult:
    w = get_workload("digits-mlp")
    calib = calibration_inputs(w, 4)
    dp, kept = _pruned("digits-mlp", "layer-adaptive", 0.9, calib)
    uni, _ = _pruned("digits-mlp", "uniform", 0.9)
    glob, _ = _pruned("digits-mlp", "global", 0.9)
    measured = {
        "accuracy": round(w.evaluate(dp), 4),
        "kept weights": sum(kept.values()),
        "layer sparsity": {k: round(v, 3) for k, v in layer_sparsity(dp).items()},
    }
    baseline = {"uniform accuracy": round(w.evaluate(uni), 4), "global accuracy": round(w.evaluate(glob), 4)}
    return ClaimResult(
        measured,
        baseline,
        measured["accuracy"] > baseline["uniform accuracy"],
        note="digits-mlp at 90%, no fine-tuning; distortion grid 0..0.98 step 0.02, exact DP "
        "over kept counts; 4 calibration batches of 64",
    )


@register_claim(
    "evopress-beats-uniform-and-global-pylm",
    method="evopress",
    paper=EVOPRESS,
    fast=False,
    promise="Evolutionary search over per-layer levels finds a lower calibration loss than uniform and global "
    "allocations at the same overall sparsity",
)
def evopress_beats_uniform_and_global() -> ClaimResult:
    w = get_workload("pylm")
    calib = calibration_inputs(w, 8)
    dense = _dense("pylm")
    out = {}
    for allocator in ("evopress", "uniform", "global"):
        model, kept = _pruned("pylm", allocator, 0.7, calib, **({"generations": 40} if allocator == "evopress" else {}))
        out[allocator] = {
            "calibration KL": round(_calibration_kl(dense, model, calib), 4),
            "val bits/byte": round(w.evaluate(model), 4),
            "kept": sum(kept.values()),
        }
    passed = out["evopress"]["calibration KL"] < min(out["uniform"]["calibration KL"], out["global"]["calibration KL"])
    return ClaimResult(
        out["evopress"],
        {"uniform": out["uniform"], "global": out["global"], "dense val bits/byte": round(w.evaluate(dense), 4)},
        passed,
        note="pylm at 70% of Linear weights; 8 calibration batches of 16x128 bytes; 40 generations x "
        "16 offspring, survivors 4 -> 1 (official prune script: 400 x 64, 8 -> 2 -> 1)",
    )


@register_claim(
    "perp-recovers-70",
    method="perp",
    paper=PERP,
    fast=False,
    promise="Retraining only biases, norms and a sparsity-preserving LoRA (< 5% of parameters) recovers most of "
    "the loss from 70% magnitude pruning",
)
def perp_recovers() -> ClaimResult:
    # As in the official code (prune_methods.py prunes the decoder blocks only), the blocks' Linear layers are
    # pruned layer-wise by magnitude and lm_head stays dense: pruning this tiny byte-level model's lm_head to 70%
    # costs 3.1 bits/byte on its own (3.33 -> 6.46), which no 100-step retraining, full or PERP, recovers.
    w = get_workload("pylm")
    dense_model = _dense("pylm")
    dense = w.evaluate(dense_model)
    model = copy.deepcopy(dense_model)
    Plan([(PERP_PRUNED, "magnitude", 0.7)]).apply(model)
    zeros = {n: m.weight == 0 for n, m in compressible_layers(model).items()}
    pruned = w.evaluate(model)
    full = copy.deepcopy(model)
    retrain(full, w, full.parameters(), PERP_STEPS, PERP_LR, seed=1)
    fraction = recover_perp(model, w, steps=PERP_STEPS, lr=PERP_LR, rank=4, seed=1)
    recovered = w.evaluate(model)
    kept_pattern = all(torch.equal(zeros[n], m.weight == 0) for n, m in compressible_layers(model).items())
    share = (pruned - recovered) / (pruned - dense)
    return ClaimResult(
        {
            "bits/byte after PERP": round(recovered, 4),
            "share of loss recovered": round(share, 3),
            "trained fraction": round(fraction, 4),
            "sparsity pattern unchanged": kept_pattern,
        },
        {
            "dense bits/byte": round(dense, 4),
            "pruned bits/byte": round(pruned, 4),
            "full masked retrain bits/byte": round(w.evaluate(full), 4),
        },
        share > 0.5 and fraction < 0.05 and kept_pattern,
        note=f"pylm, the transformer blocks' Linear layers pruned 70% each by magnitude (lm_head, embeddings dense, "
        f"as in the official code); MaskLoRA rank 4 on every Linear + biases + LayerNorms, {PERP_STEPS} AdamW steps "
        f"at the workload's tuned lr {PERP_LR:g}, no weight decay; share = (pruned - PERP) / (pruned - dense) in "
        "bits/byte (above 1 means better than the 500-step dense model, which is itself still improving); full "
        "masked retraining for the same steps is the reference",
    )


@register_claim(
    "nm-2-4-export-halves-values",
    method="nm",
    paper=NM,
    fast=True,
    promise="2:4 pruning keeps exactly 2 of every 4 consecutive input weights; the export stores half the values "
    "(plus 2-bit positions) and reloads exactly",
)
def nm_export_halves_values() -> ClaimResult:
    w = get_workload("digits-mlp")
    model = copy.deepcopy(_dense("digits-mlp"))
    Plan([(".*", "nm", "2:4")]).apply(model)
    layers = compressible_layers(model)
    valid = all(is_nm(m.weight != 0, 2, 4) or is_nm(m.sparsity_mask, 2, 4) for m in layers.values())
    with tempfile.TemporaryDirectory() as tmp:
        dense_bytes = save_dense(model, Path(tmp) / "dense.safetensors")
        nm_bytes = save_compressed(model, Path(tmp) / "nm.safetensors")
        from safetensors import safe_open

        with safe_open(str(Path(tmp) / "nm.safetensors"), framework="pt") as f:
            stored = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("::values"))  # noqa: SIM118
        reloaded = load_compressed(Path(tmp) / "nm.safetensors", w.make_model)
    x = calibration_inputs(w, 1)[0]
    identical = torch.equal(model(x), reloaded(x))
    weights = sum(m.weight.numel() for m in layers.values())
    return ClaimResult(
        {
            "stored values": stored,
            "file bytes": nm_bytes,
            "accuracy": round(w.evaluate(model), 4),
            "every group 2:4": valid,
            "reload identical": identical,
        },
        {
            "dense weights": weights,
            "dense file bytes": dense_bytes,
            "dense accuracy": round(w.evaluate(_dense("digits-mlp")), 4),
        },
        stored * 2 == weights and valid and identical and nm_bytes < dense_bytes,
        note="digits-mlp, every Linear 2:4 by magnitude along the input dimension, no fine-tuning",
    )


@register_claim(
    "gradual-magnitude-cubic-90",
    method="magnitude",
    paper=GRADUAL,
    fast=True,
    promise="Gradual magnitude pruning on the cubic schedule during training reaches 90% sparsity within 2 points "
    "of the dense model's accuracy",
)
def gradual_magnitude() -> ClaimResult:
    w = get_workload("digits-mlp")
    hp = resolve_hyperparameters("adamw", w, None)
    torch.set_num_threads(1)

    def pruner(opt: torch.optim.Optimizer) -> GradualMagnitudePruner:
        return GradualMagnitudePruner(model_box[0], 0.9, begin=50, end=300, frequency=10)

    model_box: list[nn.Module] = []

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        model_box.append(model)
        return create("adamw", model.named_parameters(), **hp)

    r = train(w, make_optimizer, seed=0, make_scheduler=pruner)
    dense = w.evaluate(_dense("digits-mlp"))
    one_shot, _ = _pruned("digits-mlp", "uniform", 0.9)
    density = {k: round(1 - v, 4) for k, v in layer_sparsity(r.model).items()}
    return ClaimResult(
        {"accuracy": round(r.final_metric, 4), "layer density": density},
        {"dense accuracy": round(dense, 4), "one-shot 90% accuracy": round(w.evaluate(one_shot), 4)},
        r.final_metric >= dense - 0.02 and all(abs(d - 0.1) < 1e-3 for d in density.values()),
        note="digits-mlp, 400 AdamW steps (workload-tuned), uniform 90% reached by the cubic schedule from step 50 "
        "to 300 every 10 steps (Zhu & Gupta), then 100 steps at fixed masks; seed 0",
    )


# PGF vs SR-STE on the harder MNIST-1D MLP: its hidden Linears have 40 and 100 inputs, so the high-sparsity
# patterns are 1:10 and 1:20 (90% and 95%, between the paper's 1:8 and 1:16 and dividing both widths).
PGF_MNIST1D_SEEDS = (0, 1, 2, 3, 4)
PGF_MNIST1D_PATTERNS = ((1, 10), (1, 20))


def _nm_accuracy_on(workload_name: str, schedule_kind: str, n: int, m: int, seed: int) -> float:
    """The workload's model trained from scratch for its budget with its hidden Linears N:M under
    ``schedule_kind`` (``mdgf-exp``: exponential decay scaled to the run, hard mask in the last 20%; ``sr-ste``),
    then finalized to plain Linears with the N:M mask; the validation metric of that truly sparse model."""
    from trainlab.compress.sparse_training import NMSchedule, NMStepper, finalize, sparsify_linears

    w = get_workload(workload_name)
    fine_tune = w.steps // 5
    if schedule_kind == "mdgf-exp":
        schedule = NMSchedule(
            n, m, "mdgf", total_steps=w.steps, fine_tune_steps=fine_tune, decay="exp",
            decay_coef=10.0 / (w.steps - fine_tune),
        )  # fmt: skip
    else:
        schedule = NMSchedule(n, m, schedule_kind)
    hp = resolve_hyperparameters("adamw", w, None)
    box: list[nn.Module] = []

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        sparsify_linears(model, schedule)
        box.append(model)
        return create("adamw", model.named_parameters(), **hp)

    train(w, make_optimizer, seed=seed, eval_every=w.steps, make_scheduler=lambda o: NMStepper(box[0]))
    finalize(box[0])
    return w.evaluate(box[0])


@functools.cache
def _pgf_mnist1d() -> dict[str, list[float]]:
    torch.set_num_threads(1)
    return {
        f"{n}:{m} {kind}": [_nm_accuracy_on("mnist1d-mlp", kind, n, m, s) for s in PGF_MNIST1D_SEEDS]
        for n, m in PGF_MNIST1D_PATTERNS
        for kind in ("mdgf-exp", "sr-ste")
    }


def _mean_se(values: list[float]) -> str:
    import statistics

    return f"{statistics.fmean(values):+.4f} ± {statistics.stdev(values) / len(values) ** 0.5:.4f}"


@register_claim(
    "pgf-beats-srste-high-nm-mnist1d",
    method="mdgf",
    paper="Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers",
    fast=False,
    promise="Progressive Gradient Flow (MDGF, exponential mask decay) trains N:M sparse networks to higher accuracy "
    "than SR-STE at high sparsity, on the harder MNIST-1D MLP (1:10 and 1:20)",
    rule="at 1:10 or 1:20, the mean over seeds 0-4 of the paired accuracy difference MDGF-exp - SR-STE exceeds twice "
    "its standard error",
    weaker="an MLP on MNIST-1D, not a transformer; 2,000 steps instead of the paper's 10^5+, so the decay constant "
    "is scaled to the run",
    known_failing="measured 2026-12-07 (seeds 0-4): SR-STE wins. 1:10 MDGF-exp 0.467 ± 0.012 (sd) vs SR-STE "
    "0.507 ± 0.022, paired -0.040 ± 0.006 (s.e.); 1:20 MDGF-exp 0.428 ± 0.004 vs SR-STE 0.447 ± 0.034, paired "
    "-0.019 ± 0.015",
)
def pgf_beats_srste_mnist1d() -> ClaimResult:
    import statistics

    acc = _pgf_mnist1d()
    measured: dict[str, object] = {}
    baseline: dict[str, object] = {}
    wins = []
    for n, m in PGF_MNIST1D_PATTERNS:
        ours, theirs = acc[f"{n}:{m} mdgf-exp"], acc[f"{n}:{m} sr-ste"]
        measured[f"{n}:{m} mdgf-exp acc per seed"] = [round(a, 4) for a in ours]
        baseline[f"{n}:{m} sr-ste acc per seed"] = [round(a, 4) for a in theirs]
        diff = [a - b for a, b in zip(ours, theirs, strict=True)]
        measured[f"{n}:{m} mdgf-exp - sr-ste (paired mean ± s.e.)"] = _mean_se(diff)
        wins.append(statistics.fmean(diff) > 2 * statistics.stdev(diff) / len(diff) ** 0.5)
    return ClaimResult(
        measured,
        baseline,
        any(wins),
        note="mnist1d-mlp, both hidden Linears N:M (head dense), the workload's 2,000 AdamW steps (lr 1e-2, no "
        "decay), seeds 0-4; MDGF-exp alpha_t = exp(-c t) with c = 10/1600, hard mask in the last 400 steps; SR-STE "
        "lambda 2e-4; accuracy of the finalized hard N:M model on the 1,000 validation signals",
    )
