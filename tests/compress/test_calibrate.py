"""Calibration: forward hooks substitute one layer's weight without editing the model; distortion curves are
taken one layer at a time; KL to the dense outputs."""

import copy

import pytest
import torch
from torch import nn

from trainlab.compress.calibrate import distortion_curves, kl_to_dense, model_outputs, substituted_weight
from trainlab.compress.plan import compressible_layers
from trainlab.compress.prune import MagnitudeLevels, kept_count, magnitude_mask


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16), nn.Linear(16, 5))


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 2, 4, 4, generator=g) for _ in range(2)]


def test_substituted_weight_equals_editing_the_layer_and_leaves_the_model_alone():
    model, x = _model(), _inputs()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("0", "3"):
        layer = compressible_layers(model)[name]
        w = layer.weight.detach() * magnitude_mask(layer.weight, layer.weight.numel() // 3)
        with substituted_weight(layer, w):
            hooked = model(x)
        edited = copy.deepcopy(model)
        with torch.no_grad():
            compressible_layers(edited)[name].weight.copy_(w)
        assert torch.allclose(hooked, edited(x), atol=1e-6, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in model.modules())


def test_distortion_curves_one_layer_at_a_time():
    model, inputs = _model(), _inputs()
    layers = compressible_layers(model)
    db = MagnitudeLevels({k: m.weight for k, m in layers.items()})
    levels = {k: [kept_count(m.weight.numel(), s) for s in (0.0, 0.5, 0.9, 1.0)] for k, m in layers.items()}
    calls = []
    curves = distortion_curves(model, layers, levels, db.weight, inputs, progress=calls.append)
    assert list(curves) == ["0", "3", "4"] and calls == [1, 1, 1]
    dense = model_outputs(model, inputs)
    for name, curve in curves.items():
        assert curve[0] == 0.0 and curve[-1] > curve[1] > 0
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            compressible_layers(pruned)[name].weight.copy_(db.weight(name, levels[name][2]))
        expected = sum(((pruned(x) - d) ** 2).sum().item() for x, d in zip(inputs, dense, strict=True))
        assert curve[2] == pytest.approx(expected / sum(d.numel() for d in dense), rel=1e-5)


def test_kl_to_dense():
    logits = torch.randn(3, 7, 11)
    assert kl_to_dense(logits, logits).item() == pytest.approx(0.0, abs=1e-12)
    other = logits + torch.randn(3, 7, 11)
    p, q = logits.reshape(-1, 11).double().softmax(-1), other.reshape(-1, 11).double().softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert kl_to_dense(logits, other).item() == pytest.approx(expected.item(), rel=1e-10)
