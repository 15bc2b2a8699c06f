import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainlab import localtrain
from trainlab.localtrain.gbnn import GBNN, newton_step


def test_newton_step_matches_the_formula():
    torch.manual_seed(0)
    f, probs = torch.randn(6, 3, dtype=torch.float64), torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1)
    y = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).double()
    r = y - probs
    expected = -(f * (y - probs)).sum() / (f**2 * probs * (probs - 1)).sum()
    torch.testing.assert_close(newton_step(f, r, probs), expected, rtol=1e-14, atol=0)


def _trainer(**kw):
    hp = {"total_units": 6, "units_per_stage": 2, "eta": 0.7, "subsample": 0.5, "max_iter": 15, "alpha": 1e-4}
    hp.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GBNN(nn.Flatten(), num_classes=3, seed=0, **hp)


def test_stages_fit_the_residuals_and_the_network_is_their_boosted_sum():
    torch.manual_seed(0)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(20) % 3
    trainer = _trainer()
    fitted = []
    fit_stage = trainer.fit_stage

    def recording(xs, residual):
        stage = fit_stage(xs, residual)
        fitted.append((xs, residual, stage))
        return stage

    trainer.fit_stage = recording
    for _ in range(3):
        trainer.step(x, y)
    with pytest.raises(RuntimeError, match="all 6 units are trained"):
        trainer.step(x, y)
    targets = F.one_hot(y, 3).double()
    boosted = torch.zeros(20, 3, dtype=torch.float64)
    partial = []
    with torch.no_grad():
        for xs, residual, stage in fitted:
            probs = torch.softmax(boosted, 1)
            rows = (xs[:, None, :] == x[None]).all(-1).float().argmax(1)  # which rows the stage saw
            assert len(set(rows.tolist())) == 10  # a half subsample, without repeats
            torch.testing.assert_close(residual, (targets - probs)[rows], rtol=0, atol=1e-12)
            f = stage(x)
            boosted = boosted + 0.7 * newton_step(f, targets - probs, probs) * f
            partial.append(boosted.clone())
        torch.testing.assert_close(trainer.predictor(x), boosted, rtol=0, atol=1e-10)
        torch.testing.assert_close(trainer.network.truncated(4)(x), partial[1], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"units must be in \[0, 6\]"):
        trainer.network.truncated(7)


def test_bad_stage_size_and_replaced_layers_are_reported():
    with pytest.raises(ValueError, match="must divide total_units"):
        _trainer(total_units=5)
    with pytest.warns(UserWarning, match="replaced by a boosted one-hidden-layer network"):
        localtrain.create("gbnn", nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), num_classes=3)


def test_gbnn_learns_digits(digits, accuracy):
    x, y, xv, yv = digits
    trainer = _trainer(total_units=16, max_iter=30)
    trainer.num_classes = 10
    for _ in range(8):
        trainer.step(x, y)
    assert accuracy(trainer.predictor, xv, yv) > 0.7  # chance is 0.1


def _recorded(trainer):
    fitted = []
    fit_stage = trainer.fit_stage

    def recording(xs, residual):
        stage = fit_stage(xs, residual)
        fitted.append((xs, residual, stage))
        return stage

    trainer.fit_stage = recording
    return fitted


def _rows(xs, x):
    return (xs[:, None, :] == x[None]).all(-1).float().argmax(1)


def test_binary_boosts_the_half_log_odds_with_its_newton_step():
    """Binary deviance log(1 + exp(-2yF)), y = ±1: F_0, residuals 2y/(1 + exp(2yF)), ρ = Σrf / Σf²r(2y - r)."""
    torch.manual_seed(0)
    x = torch.randn(20, 4, dtype=torch.float64)
    labels = (torch.arange(20) % 5 < 3).long()  # 12 ones, 8 zeros
    trainer = _trainer(eta=0.7)
    trainer.num_classes = 2
    trainer.task = "binary"
    fitted = _recorded(trainer)
    for _ in range(3):
        trainer.step(x, labels)
    y = (2 * labels - 1).double()[:, None]
    boosted = torch.full((20, 1), 0.5 * math.log((1 + 0.2) / (1 - 0.2)), dtype=torch.float64)  # ȳ = 0.2
    partial = []
    with torch.no_grad():
        for xs, residual, stage in fitted:
            r = 2 * y / (1 + torch.exp(2 * y * boosted))
            torch.testing.assert_close(residual, r[_rows(xs, x)], rtol=0, atol=1e-12)
            f = stage(x)
            rho = (r * f).sum() / (f**2 * r * (2 * y - r)).sum()
            boosted = boosted + 0.7 * rho * f
            partial.append(boosted.clone())
        scores = trainer.predictor(x)
        torch.testing.assert_close(scores, torch.cat([torch.zeros_like(boosted), 2 * boosted], 1), rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.softmax(scores, 1)[:, 1:], 1 / (1 + torch.exp(-2 * boosted)))  # P(y = 1)
        torch.testing.assert_close(trainer.network.truncated(2)(x)[:, 1:], 2 * partial[0], rtol=0, atol=1e-10)
    assert trainer.predictor(x).argmax(1).eq(labels).float().mean() > 0.5


def test_regression_boosts_the_mean_with_unit_steps():
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    target = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 3.0
    trainer = _trainer(total_units=8, eta=0.5, max_iter=50, task="regression")
    fitted = _recorded(trainer)
    losses = [float(trainer.step(x, target)) for _ in range(4)]
    boosted = torch.full((40, 1), float(target.mean()), dtype=torch.float64)
    with torch.no_grad():
        for xs, residual, stage in fitted:
            torch.testing.assert_close(residual, (target[:, None] - boosted)[_rows(xs, x)], rtol=0, atol=1e-12)
            boosted = boosted + 0.5 * stage(x)
        torch.testing.assert_close(trainer.predictor(x), boosted[:, 0], rtol=0, atol=1e-10)
        torch.testing.assert_close(trainer.network.truncated(0)(x), torch.full_like(target, float(target.mean())))
    assert losses[-1] < losses[0] < float(target.var(unbiased=False))  # below the constant model's MSE


def test_task_choice_and_bad_targets():
    assert _trainer().task == "multiclass"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert localtrain.create("gbnn", nn.Flatten(), num_classes=2).task == "binary"  # "auto", as the official code
    with pytest.raises(ValueError, match="task"):
        localtrain.create("gbnn", nn.Flatten(), num_classes=2, task="ranking")
    x = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="regression targets must be a float vector"):
        _trainer(task="regression").step(x, torch.arange(6))
    binary = _trainer(task="binary")
    with pytest.raises(ValueError, match="binary labels must be 0 or 1"):
        binary.step(x, torch.arange(6))
