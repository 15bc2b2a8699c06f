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
