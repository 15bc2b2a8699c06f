"""ConvTranspose and Conv3d layers are never compressed: a rule that names one is refused with the reason, a
pattern that also covers one warns that it stays dense, and the layer is left untouched."""

import warnings

import pytest
import torch
from torch import nn

from trainlab.compress.plan import Plan, compressible_layers, unsupported_layers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ConvTranspose2d(4, 4, 2, stride=2),
        nn.Conv3d(1, 2, 1),
        nn.Linear(8, 8),
    )


def test_unsupported_layers_are_listed_and_not_compressible():
    model = _model()
    assert unsupported_layers(model) == {"1": "ConvTranspose2d", "2": "Conv3d"}
    assert set(compressible_layers(model)) == {"0", "3"}


@pytest.mark.parametrize("pattern", ["1", "2", "[12]"])
def test_a_rule_naming_only_unsupported_layers_is_refused_with_the_reason(pattern):
    with pytest.raises(ValueError, match=r"names .*(ConvTranspose2d|Conv3d).*ConvTranspose weights are laid out"):
        Plan([(pattern, "magnitude", 0.5)]).resolve(_model())


def test_a_pattern_covering_unsupported_layers_warns_and_leaves_them_dense():
    model = _model()
    before = {n: m.weight.detach().clone() for n, m in model.named_children() if n in ("1", "2")}
    with pytest.warns(UserWarning, match=r"leaves 1 \(ConvTranspose2d\), 2 \(Conv3d\) dense"):
        resolved = Plan([(".*", "magnitude", 0.5)]).apply(model)
    assert set(resolved) == {"0", "3"}
    assert all(torch.equal(getattr(model, n).weight, w) for n, w in before.items())


def test_a_pattern_that_misses_unsupported_layers_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(Plan([("[03]", "magnitude", 0.5)]).resolve(_model())) == {"0", "3"}
