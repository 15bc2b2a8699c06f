"""Fine-tuning workloads: a network pretrained on one task, adapted to a shifted one.

``digits-shifted``: the digits MLP (64-128-128-10) pretrained on the 8x8 digits (AdamW lr 3e-3, 400 steps, seed 0:
~0.97 validation accuracy), then adapted to the same digits rolled two pixels to the right, where it starts far
lower. Its ``make_model`` returns a fresh copy of the pretrained network; the adapters, or full fine-tuning, come
from the runner's caller (``trainlab.lab.finetune``).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from trainlab.lab.workloads.base import Workload, get_workload, register_workload
from trainlab.lab.workloads.digits import digits_data
from trainlab.lab.workloads.supervised import accuracy_evaluator, cross_entropy_loss, sample_rows

SHIFT_PIXELS = 2


@functools.cache
def pretrained_digits_mlp() -> nn.Module:
    """The digits-mlp network trained on unshifted digits (seed 0, 400 steps of the workload's AdamW), reused from
    the trainlab cache directory when it is there."""
    from trainlab.lab.compression import default_cache_dir, trained_model

    return trained_model(get_workload("digits-mlp"), seed=0, steps=400, cache_dir=default_cache_dir()).eval()


@functools.cache
def shifted_digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_train, y_train, x_val, y_val = digits_data()
    return torch.roll(x_train, SHIFT_PIXELS, dims=-1), y_train, torch.roll(x_val, SHIFT_PIXELS, dims=-1), y_val


@register_workload("digits-shifted")
def digits_shifted() -> Workload:
    return Workload(
        name="digits-shifted",
        description=f"digits MLP pretrained on 8x8 digits, fine-tuned on digits rolled {SHIFT_PIXELS} pixels right",
        make_model=lambda: copy.deepcopy(pretrained_digits_mlp()).train(),
        make_batch=lambda batch_size, generator: sample_rows(shifted_digits_data()[:2], batch_size, generator),
        loss=cross_entropy_loss,
        evaluate=accuracy_evaluator(lambda: shifted_digits_data()[2:]),
        metric="accuracy",
        higher_is_better=True,
        target=0.9,
        steps=300,
        batch_size=64,
        eval_every=10,
        hyperparameters={"adamw": {"lr": 3e-3, "weight_decay": 0.0}},
    )
