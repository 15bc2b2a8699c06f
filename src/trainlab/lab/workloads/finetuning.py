"""Fine-tuning workloads: a network pretrained on one task, adapted to a shifted one.

``pylm-heldout``: the pylm byte GPT pretrained on the stdlib training files (500 AdamW steps, seed 0, cached),
adapted to the held-out validation files (three of every four 2 KiB blocks to adapt on, the fourth to measure).
Measured (seed 0, one shared CPU core): pretrained 3.27 bits/byte; full fine-tuning with AdamW lr 3e-4 reaches
3.14 at step 60 and 3.06 at step 200 (hence the target 3.15); LoRA r 8 at lr 1e-3 reaches 3.16 at step 200.
(Adapting on the first 75% of the held-out bytes and measuring on the last 25%, other files, made every run
worse than the pretrained model: the files differ more than the split helps.)

``digits-shifted``: the digits MLP (64-128-128-10) pretrained on the 8x8 digits (AdamW lr 3e-3, 400 steps, seed 0:
~0.97 validation accuracy), then adapted to the same digits rolled two pixels to the right, where it starts far
lower. Its ``make_model`` returns a fresh copy of the pretrained network; the adapters, or full fine-tuning, come
from the runner's caller (``trainlab.lab.finetune``).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

from trainlab.lab.workloads.base import Workload, get_workload, register_workload
from trainlab.lab.workloads.digits import digits_data
from trainlab.lab.workloads.pylm import CONTEXT, lm_loss, pylm_corpus
from trainlab.lab.workloads.pylm import _windows as byte_windows
from trainlab.lab.workloads.supervised import accuracy_evaluator, cross_entropy_loss, sample_rows
from trainlab.runtime import evaluating

SHIFT_PIXELS = 2


@functools.cache
def pretrained_digits_mlp() -> nn.Module:
    """The digits-mlp network trained on unshifted digits (seed 0, 400 steps of the workload's AdamW), reused from
    the trainlab cache directory when it is there."""
    from trainlab.lab.cache import default_cache_dir
    from trainlab.lab.compression import trained_model

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


HELDOUT_BLOCK = 2048


@functools.cache
def pretrained_pylm() -> nn.Module:
    """The pylm model trained on the training files (seed 0, its 500 AdamW steps), reused from the cache."""
    from trainlab.lab.cache import default_cache_dir
    from trainlab.lab.compression import trained_model

    return trained_model(get_workload("pylm"), seed=0, steps=500, cache_dir=default_cache_dir()).eval()


def heldout_streams() -> tuple[torch.Tensor, torch.Tensor]:
    """pylm's validation bytes (files it never trained on) in 2 KiB blocks: every fourth block to measure, the rest
    to adapt on, so both sides come from the same held-out files (their identifiers, their style)."""
    val = pylm_corpus().val
    blocks = val[: len(val) // HELDOUT_BLOCK * HELDOUT_BLOCK].view(-1, HELDOUT_BLOCK)
    measured = torch.arange(len(blocks)) % 4 == 3
    return blocks[~measured].flatten(), blocks[measured].flatten()


def _heldout_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    train = heldout_streams()[0]
    starts = torch.randint(0, len(train) - CONTEXT, (batch_size,), generator=generator)
    return byte_windows(train, starts, CONTEXT)


def heldout_bits_per_byte(model: nn.Module) -> float:
    val = heldout_streams()[1]
    starts = torch.linspace(0, len(val) - CONTEXT - 1, 64).long()
    with evaluating(model):
        return lm_loss(model, byte_windows(val, starts, CONTEXT)).item() / math.log(2)


@register_workload("pylm-heldout")
def pylm_heldout() -> Workload:
    return Workload(
        name="pylm-heldout",
        description="pylm's 2-layer byte GPT pretrained on the train files, adapted to held-out stdlib files",
        make_model=lambda: copy.deepcopy(pretrained_pylm()).train(),
        make_batch=_heldout_batch,
        loss=lm_loss,
        evaluate=heldout_bits_per_byte,
        metric="bits_per_byte",
        higher_is_better=False,
        target=3.15,
        steps=200,
        batch_size=16,
        eval_every=20,
        hyperparameters={"adamw": {"lr": 3e-4, "weight_decay": 0.0, "betas": (0.9, 0.95)}},
    )
