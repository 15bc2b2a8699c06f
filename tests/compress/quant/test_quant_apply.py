"""quantize_model: every registered method quantizes every layer, the packed file reloads to exactly the model
that was evaluated, conv layers work, second-order compensation lowers the calibration loss, bad input errors."""

import pytest
import torch
from torch import nn

from trainlab.compress.plan import compressible_layers
from trainlab.compress.quant.apply import (
    flat_weight,
    layer_gradients,
    layer_loss,
    load_quantized_model,
    quantize_model,
    save_quantized_model,
)
from trainlab.compress.registry import compressor_names, get_compressor
from trainlab.lab.compression import calibration_batches, calibration_inputs, trained_model
from trainlab.lab.workloads import get_workload


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    w = get_workload("digits-mlp")
    model = trained_model(w, 0, 40, tmp_path_factory.mktemp("cache"))
    return w, model, calibration_inputs(w, 2)


# quantizers taking one bit-width per layer (baq's per-column bits come from its allocator: test_front_door.py)
QUANTIZERS = [n for n in compressor_names("quantizer") if get_compressor(n).level == "bits"]


def _bits(method: str) -> int:
    allowed = get_compressor(method).bits
    return 3 if allowed is None else allowed[0]


@pytest.mark.parametrize("method", QUANTIZERS)
def test_every_method_round_trips_through_the_packed_file(setup, tmp_path, method):
    w, model, calib = setup
    before = [p.clone() for p in model.parameters()]
    second = get_compressor(method).second_order == "always"
    grads = None
    if "gradient" in get_compressor(method).needs:
        grads = layer_gradients(model, calibration_batches(w, 1), w.loss)
        with pytest.raises(ValueError, match="gradient"):
            quantize_model(model, method, 3)
    qm = quantize_model(
        model, method, _bits(method), second_order=second, calibration=calib, gradients=grads, runtime="float"
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # input untouched
    assert set(qm.weights) == set(compressible_layers(model))
    layers, quantized = compressible_layers(model), compressible_layers(qm.model)
    assert all(not torch.equal(layers[k].weight, quantized[k].weight) for k in layers)
    path = tmp_path / "q.safetensors"
    size = save_quantized_model(qm, path)
    assert size == path.stat().st_size < 25856 * 4 / 6
    reloaded = load_quantized_model(path, w.make_model, runtime="float")
    x = calib[0]
    assert torch.equal(reloaded(x), qm.model(x))


def test_conv_layers_quantize_with_second_order(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    calib = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    rtn = quantize_model(model, "rtn", 3, runtime="float")
    gptq = quantize_model(model, "rtn", 3, second_order=True, calibration=calib, runtime="float")
    for name in ("0", "3"):
        h = gptq.hessians[name]
        ref = flat_weight(compressible_layers(model)[name])
        assert h.shape == (ref.shape[1], ref.shape[1])
        loss_rtn = layer_loss(ref, flat_weight(compressible_layers(rtn.model)[name]), h)
        loss_gptq = layer_loss(ref, flat_weight(compressible_layers(gptq.model)[name]), h)
        assert loss_gptq < loss_rtn
    # the conv Hessian is that of the unfolded patches: it predicts the conv's output error exactly
    conv, qconv = model[0], gptq.model[0]
    err = sum(((conv(x) - qconv(x)).square().sum() / (x.shape[0] * 36)).item() for x in calib) / len(calib)
    assert layer_loss(flat_weight(conv), flat_weight(qconv), gptq.hessians["0"]) == pytest.approx(2 * err, rel=1e-4)
    path = tmp_path / "c.safetensors"
    save_quantized_model(gptq, path)
    x = calib[0]
    assert torch.equal(load_quantized_model(path, lambda: type(model)(*list(model)), runtime="float")(x), gptq.model(x))


def test_mixed_bits_per_layer_and_errors(setup):
    _, model, calib = setup
    qm = quantize_model(model, "rtn", {"1": 4, "3": 2, "5": 8}, runtime="float")
    assert qm.bits == {"1": 4, "3": 2, "5": 8}
    assert max(len(torch.unique(r)) for r in qm.model[3].weight) <= 4
    with pytest.raises(ValueError, match="bits must name exactly the layers"):
        quantize_model(model, "rtn", {"1": 4})
    with pytest.raises(ValueError, match="whole number of bits in \\[2, 8\\], got 9"):
        quantize_model(model, "rtn", 9)
    with pytest.raises(ValueError, match="unknown compressor 'nope'"):
        quantize_model(model, "nope", 3)
    with pytest.raises(ValueError, match="calibration inputs"):
        quantize_model(model, "rtn", 3, second_order=True)
    with pytest.raises(ValueError, match="no second-order"):
        quantize_model(model, "ptqtp", 3, second_order=True, calibration=calib)
