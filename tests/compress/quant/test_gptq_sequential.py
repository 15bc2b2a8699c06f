"""Sequential calibration (the GPTQ reference's layer-by-layer order): each layer's Hessian is 2 X^T X / n of
the inputs produced by the already-quantized earlier layers, layers are taken in forward order, and a layer that
runs twice per pass is measured over both calls."""

import pytest
import torch
from torch import nn

from trainlab.compress.quant.gptq import collect_hessians, quantize_sequentially

F64 = torch.float64


class _OutOfOrder(nn.Module):
    """Registered b, a, head; called a, b, head."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(8, 8)
        self.a = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _hess(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def test_each_hessian_sees_the_quantized_earlier_layers_in_forward_order():
    torch.manual_seed(0)
    model = _OutOfOrder().double()
    inputs = [torch.randn(20, 6, dtype=F64), torch.randn(12, 6, dtype=F64)]
    layers = {"b": model.b, "a": model.a, "head": model.head}
    dense_b = collect_hessians(model, inputs, {"b": model.b})["b"]
    seen = []

    def round_weight(name: str, hessian: torch.Tensor) -> None:
        seen.append(name)
        with torch.no_grad():
            layers[name].weight.copy_(torch.round(layers[name].weight * 4) / 4)

    hessians = quantize_sequentially(model, inputs, layers, round_weight)
    assert seen == ["a", "b", "head"] and list(hessians) == seen
    x = torch.cat(inputs)
    h_a = torch.relu(model.a(x))  # model.a and model.b are the quantized layers now
    expected = {"a": _hess(x), "b": _hess(h_a), "head": _hess(torch.relu(model.b(h_a)))}
    for name in seen:
        assert torch.allclose(hessians[name], expected[name], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dense_b, hessians["b"])  # the one-pass Hessian of the dense model differs


def test_without_changes_sequential_hessians_equal_the_one_pass_ones():
    torch.manual_seed(1)
    model = _OutOfOrder().double()
    inputs = [torch.randn(16, 6, dtype=F64)]
    layers = dict(model.named_children())
    one_pass = collect_hessians(model, inputs, layers)
    sequential = quantize_sequentially(model, inputs, layers, lambda name, h: None)
    assert all(torch.allclose(sequential[n], one_pass[n], rtol=1e-13) for n in layers)


def test_a_layer_called_twice_per_pass_counts_both_calls():
    torch.manual_seed(2)
    shared = nn.Linear(5, 5).double()
    model = nn.Sequential(shared, nn.Tanh(), shared).double()
    x = torch.randn(10, 5, dtype=F64)
    hessian = quantize_sequentially(model, [x], {"0": shared}, lambda name, h: None)["0"]
    assert torch.allclose(hessian, _hess(torch.cat([x, torch.tanh(shared(x))])), rtol=1e-12)


def test_an_unused_layer_is_named():
    model = _OutOfOrder()
    unused = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"layers \['unused'\]"):
        quantize_sequentially(model, [torch.randn(3, 6)], {"a": model.a, "unused": unused}, lambda n, h: None)


def test_the_front_door_quantizes_sequentially_on_request():
    from trainlab.compress import compress

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    calibration = [torch.randn(64, 16, dtype=F64)]
    plan = [(".*", "rtn", 3)]
    one_pass = compress(model, plan, calibration=calibration, second_order=True, runtime="float")
    sequential = compress(model, plan, calibration=calibration, second_order=True, sequential=True, runtime="float")
    quantized_first = sequential.model[0](calibration[0])
    assert torch.allclose(sequential.hessians["2"], _hess(torch.relu(quantized_first)), rtol=1e-12)
    assert torch.equal(sequential.model[0].weight, one_pass.model[0].weight)  # the first layer sees the same inputs
    assert not torch.equal(sequential.model[2].weight, one_pass.model[2].weight)
    with pytest.raises(ValueError, match="sequential=True"):
        compress(model, plan, calibration=calibration, sequential=True)  # no second order: nothing to measure
