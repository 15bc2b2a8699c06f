import pytest
import torch

from trainlab.runtime import batch_generator


@pytest.fixture(scope="session")
def digits():
    """(x_train, y_train, x_val, y_val) of the built-in digits split, flattened."""
    from trainlab.lab.workloads.digits import digits_data

    x, y, xv, yv = digits_data()
    return x.flatten(1), y, xv.flatten(1), yv


def _batches(x, y, steps, size=64, seed=0):
    for step in range(steps):
        index = torch.randperm(len(y), generator=batch_generator(seed, step))[:size]
        yield x[index], y[index]


def _accuracy(predictor, x, y):
    with torch.no_grad():
        return (predictor(x).argmax(1) == y).float().mean().item()


@pytest.fixture
def batches():
    """``batches(x, y, steps, size=64, seed=0)``: seeded random minibatches."""
    return _batches


@pytest.fixture
def accuracy():
    """``accuracy(predictor, x, y)``."""
    return _accuracy
