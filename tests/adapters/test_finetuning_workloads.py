"""The fine-tuning workloads' data: generated offline, split without overlap."""

from __future__ import annotations

import torch

from trainlab.lab.workloads.finetuning import SHIFT_PIXELS, shifted_digits_data
from trainlab.lab.workloads.minilm_docstrings import MODULES, docstring_dataset


def test_docstring_dataset_covers_every_module_and_splits_cleanly() -> None:
    x_train, y_train, x_val, y_val = docstring_dataset()
    assert set(y_train) == set(range(len(MODULES))) and len(x_train) == len(y_train) > 500
    assert 0.1 < len(x_val) / (len(x_train) + len(x_val)) < 0.35
    assert all(len(t) >= 24 and "\n" not in t for t in x_train + x_val)


def test_shifted_digits_are_the_digits_rolled() -> None:
    from trainlab.lab.workloads.digits import digits_data

    x, y, _, _ = digits_data()
    xs, ys, _, _ = shifted_digits_data()
    assert torch.equal(ys, y) and torch.equal(xs[..., SHIFT_PIXELS:], x[..., :-SHIFT_PIXELS])
