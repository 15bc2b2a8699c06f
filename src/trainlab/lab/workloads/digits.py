"""scikit-learn's bundled 8x8 handwritten digits (1,797 images), classified by an MLP or a small CNN."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from trainlab.lab.workloads.base import Workload, register_workload
from trainlab.lab.workloads.supervised import accuracy_evaluator, cross_entropy_loss, sample_rows


@functools.cache
def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: pixels in [0, 1] as (n, 1, 8, 8), a fixed stratified 80/20 split."""
    # Imported here, not at module level: scikit-learn takes ~1.5 s to import and only the data needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, val = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    return x[train], y[train], x[val], y[val]


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


# Tuned on seeds 0-2: AdamW reaches 0.97 (MLP) / 0.975 (CNN) by step 150; SGD's lr 0.3 diverges on the CNN.
# Lion and the second-order methods were tuned on the MLP only (Lion at its default lr 1e-4 never gets there).
# Steps to 0.95 on the MLP, seeds 0-2, evaluated every 25 steps:
# adahessian lr 0.05/0.15/0.3 -> 150-175 / 75-150 / 150-350: the paper's 0.15 is best.
# mkor lr 0.05/0.1/0.2 -> 100 / 75-100 / 175-325: the default 0.1 (SGD's) is best.
# mfac (ngrads, damp, lr): (128, 1e-2, 1e-2) -> 100-150; (128, 1e-3, 1e-2) -> 150-225;
# (32, 0.1, 0.1) -> 100-200; (1024, 1e-2, 1e-2) -> 125-150 at ~15x the wall time of ngrads 128.
# The paper's damp 1e-5 with lr 1e-3 does not reach the target in 400 steps: 1/damp scales the
# directions outside the window's span, so lr/damp (not lr) sets the step there.
_HYPERPARAMETERS = {
    "adamw": {"lr": 3e-3, "weight_decay": 1e-2},
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "lion": {"lr": 1e-3, "weight_decay": 0.0},
    "adahessian": {"lr": 0.15, "seed": 0},
    "mfac": {"lr": 1e-2, "ngrads": 128, "damp": 1e-2},
    "mkor": {"lr": 0.1, "momentum": 0.9},
    # Backprop-free (trainlab.localtrain), MLP, seed 0, batch 64: Forward-Forward's lr 0.03 (its full-batch
    # default) ends at 0.72 after 1200 steps, 0.01 drops from 0.92 to 0.83, 0.003 reaches 0.94. EGGROLL's
    # defaults (σ 0.2, lr 0.03, SGD) stay at chance; σ 0.05 with AdamW lr 0.01 reaches 0.94 in 300 generations.
    "forward-forward": {"lr": 3e-3},
    "eggroll": {"sigma": 0.05, "lr": 0.01, "optimizer": "adamw"},
}


def _digits_workload(name: str, description: str, make_model: Callable[[], nn.Module], target: float) -> Workload:
    return Workload(
        name=name,
        description=description,
        make_model=make_model,
        make_batch=lambda batch_size, generator: sample_rows(digits_data()[:2], batch_size, generator),
        loss=cross_entropy_loss,
        evaluate=accuracy_evaluator(lambda: digits_data()[2:]),
        metric="accuracy",
        higher_is_better=True,
        target=target,
        steps=400,
        batch_size=64,
        eval_every=25,
        hyperparameters=_HYPERPARAMETERS,
    )


@register_workload("digits-mlp")
def digits_mlp() -> Workload:
    return _digits_workload("digits-mlp", "8x8 digits, MLP 64-128-128-10", _mlp, 0.95)


@register_workload("digits-cnn")
def digits_cnn() -> Workload:
    return _digits_workload("digits-cnn", "8x8 digits, CNN conv16-conv32-pool-linear", _cnn, 0.96)
