"""Calibrated allocators take the user's ``output_fn(model, batch) -> tensor`` for outputs trainlab cannot read."""

import pytest
import torch
from torch import nn

from trainlab.compress import allocate_plan, compress, compressible_layers
from trainlab.compress.batches import output_of


class Scores:  # no tensor attribute named logits / last_hidden_state, not a Mapping or a tuple
    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores


class CustomOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return Scores(self.b(torch.relu(self.a(x))))


def _scores(model, batch):
    return model(batch).scores


CASES = [
    ("hawq", {"bits": 3}),
    ("evopress", {"bits": 3, "generations": 3, "offspring": 4}),
    ("evopress", {"sparsity": 0.5, "generations": 3, "offspring": 4}),
    ("layer-adaptive", {"sparsity": 0.5}),
]


def _setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return CustomOut(), [torch.randn(8, 16, generator=g) for _ in range(2)]


@pytest.mark.parametrize(("allocator", "budget"), CASES, ids=[f"{a}-{next(iter(b))}" for a, b in CASES])
def test_allocators_need_output_fn_for_a_custom_output_and_spend_the_budget_with_it(allocator, budget):
    model, batches = _setup()
    with pytest.raises(TypeError, match="holds no tensor"):
        allocate_plan(allocator, model, calibration=batches, **budget)
    plan = allocate_plan(allocator, model, calibration=batches, output_fn=_scores, **budget)
    result = compress(model, plan, calibration=batches)
    sizes = sum(m.weight.numel() for m in compressible_layers(model).values())
    if "sparsity" in budget:
        assert result.report.sparsity == pytest.approx(0.5, abs=1 / sizes)
    else:
        assert result.report.mean_bits == pytest.approx(3, abs=1e-9)


def test_output_fn_is_what_the_measurements_compare():
    from trainlab.compress.calibrate import distortion_curves

    model, batches = _setup()
    layer = {"b": model.b}
    zero = {"b": [0]}
    curve = distortion_curves(model, layer, zero, lambda name, level: torch.zeros_like(model.b.weight), batches,
                              output_fn=_scores)["b"]  # fmt: skip
    dense = torch.cat([_scores(model, x) for x in batches]).detach()
    expected = (dense - model.b.bias.detach()).square().mean()  # only the bias is left of layer b
    assert curve[0] == pytest.approx(expected.item(), rel=1e-5)


def test_output_fn_must_return_a_tensor_and_be_callable():
    model, batches = _setup()
    with pytest.raises(TypeError, match="output_fn"):
        output_of(model, batches[0], lambda m, b: m(b))
    with pytest.raises(TypeError, match="output_fn must be a callable"):
        allocate_plan("hawq", model, calibration=batches, bits=3, output_fn="scores")
