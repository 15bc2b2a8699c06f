"""QuantizedLinear: each kernel path equals the dequantized reference to the kernel's precision (bfloat16
activations and scales, float32 accumulation, a bfloat16 output), per shape class; fallbacks name their reason."""

import pytest
import torch
from torch import nn

from trainlab.compress import compress
from trainlab.compress.export import load_model, save_model
from trainlab.compress.quant.grids import quantize_rtn
from trainlab.compress.quantized_linear import QuantizedLinear, runtime_model

BF16 = torch.bfloat16


def kernel_reference(q, x: torch.Tensor) -> torch.Tensor:
    """x W^T in float64 with what the kernels see: x and the per-group scale rounded to bfloat16."""
    rows, cols = q.shape
    span = cols if q.group_size is None else q.group_size
    scale = q.scale.to(BF16).double().repeat_interleave(span, 1)[:, :cols]
    zero = q.zero.double().repeat_interleave(span, 1)[:, :cols]
    return x.to(BF16).double() @ ((q.codes.double() - zero) * scale).T


@pytest.mark.parametrize(
    ("bits", "symmetric", "group_size", "shape", "kernel"),
    [
        (4, True, 128, (48, 256), "int4"),  # grouped, symmetric
        (4, False, 64, (32, 128), "int4"),  # grouped, asymmetric 4-bit: zero term (8 - z) s
        (3, False, None, (32, 384), "int4"),  # per-channel over kernel groups of 128, codes shifted
        (2, True, 32, (16, 96), "int4"),
        (8, True, None, (40, 64), "int8"),
        (4, True, None, (24, 64), "int8"),  # 24 rows: not int4-able, per-channel: int8
    ],
)
def test_kernel_matches_reference(bits, symmetric, group_size, shape, kernel):
    torch.manual_seed(0)
    q = quantize_rtn(torch.randn(shape), bits, symmetric=symmetric, group_size=group_size)
    layer = QuantizedLinear(q, torch.randn(shape[0]))
    assert layer.kernel == kernel, layer.reason
    x = torch.randn(2, 5, shape[1])
    y = layer(x)
    assert layer(torch.randn(5, 2, shape[1]).bfloat16().transpose(0, 1)).shape == (2, 5, shape[0])  # strided input
    assert y.shape == (2, 5, shape[0]) and y.dtype == torch.float32
    ref = kernel_reference(q, x.reshape(-1, shape[1])).reshape(y.shape) + layer.bias.double()
    scale = (x.reshape(-1, shape[1]).abs().double() @ q.dequantize(torch.float64).abs().T).reshape(y.shape)
    # bfloat16 output rounding (2^-8 relative), plus zero-term rounding and fp32 accumulation (2^-8 of sum |x||w|)
    err = (y.double() - ref).abs()
    assert (err <= 2**-8 * ref.abs() + 2**-8 * scale + 1e-6).all(), float(err.max())
    # and the kernel is not a coarser quantizer: far below one quantization step times sum |x|
    assert float(err.max()) < 0.05 * float(q.scale.float().max() * x.abs().sum(-1).max())


def test_fallbacks_name_their_reason_and_are_exact():
    torch.manual_seed(0)
    q = quantize_rtn(torch.randn(32, 64), 8, symmetric=False)
    layer = QuantizedLinear(q)
    assert layer.kernel == "dequantize" and "int8 range" in layer.reason
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ q.dequantize().T, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no low-bit kernel"):
        QuantizedLinear(q, mode="kernel")
    cached = QuantizedLinear(q, mode="cache")
    assert cached.kernel == "cached"
    torch.testing.assert_close(cached(x), x @ q.dequantize().T, rtol=0, atol=0)
    q5 = quantize_rtn(torch.randn(32, 96), 4, group_size=48)  # 48 is no kernel group: int8 needs per-channel
    assert QuantizedLinear(q5).kernel == "dequantize"
    # torch 2.13's int8 kernel crashes the process on input sizes not divisible by 16 (here 40 and 100)
    for shape in ((100, 40), (10, 100)):
        q8 = quantize_rtn(torch.randn(shape), 3, symmetric=True)
        narrow = QuantizedLinear(q8)
        assert narrow.kernel == "dequantize" and f"input size {shape[1]} is not divisible by 16" in narrow.reason
        xs = torch.randn(7, shape[1])
        torch.testing.assert_close(narrow(xs), xs @ q8.dequantize().T, rtol=0, atol=0)
        assert QuantizedLinear(q8, mode="dynamic").kernel == "int8-dynamic"  # torch._int_mm takes any width
    with pytest.raises(ValueError, match="mode"):
        QuantizedLinear(q, mode="fast")


def test_runtime_model_and_load_rebuild_kernel_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    result = compress(model, [(r"\d+", "rtn", 4)], group_size=32, runtime="float")
    fast = runtime_model(result.model, result.weights)
    assert isinstance(model[0], nn.Linear)  # the caller's model is untouched
    assert [fast[i].kernel for i in (0, 2)] == ["int4", "int4"]
    x = torch.randn(4, 64)
    torch.testing.assert_close(fast(x), result.model(x), rtol=2e-2, atol=2e-2)
    path = tmp_path / "m.safetensors"
    save_model(result.model, path, result.weights)
    loaded = load_model(path, lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), runtime="auto")
    assert [loaded[i].kernel for i in (0, 2)] == ["int4", "int4"]
    torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)


def test_pruned_and_quantized_layers_keep_their_zeros_on_the_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    result = compress(model, [("0", "magnitude", 0.5), ("0", "rtn", 4)], group_size=32)
    fast = result.runtime_model()
    assert fast[0].kernel == "int4"
    x = torch.eye(64)  # each output row is one column of the weight: pruned entries must come out exactly 0
    pruned = result.float_model()[0].weight.detach().T == 0
    assert float(pruned.float().mean()) >= 0.5
    assert (fast(x) - fast[0].bias)[pruned].abs().max() == 0


def test_dynamic_mode_quantizes_activations_per_row_and_is_opt_in():
    torch.manual_seed(0)
    q = quantize_rtn(torch.randn(48, 96), 4)  # per channel: q - z fits int8, the weight is exact
    layer = QuantizedLinear(q, torch.randn(48), mode="dynamic")
    assert layer.kernel == "int8-dynamic" and "per row" in layer.reason
    assert QuantizedLinear(q).kernel == "int4"  # auto never takes it: it adds activation error
    x = torch.randn(2, 5, 96)
    x[0, 0] = 0  # an all-zero row: its step is clamped, its output is the bias
    y = layer(x)
    flat = x.reshape(-1, 96)
    step = flat.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    seen = torch.round(flat / step).double() * step.double()  # the int8 activations the kernel multiplies
    w = q.dequantize(torch.float64)
    ref = seen @ w.T + layer.bias.double()
    scale = seen.abs() @ w.abs().T + layer.bias.double().abs()
    err = (y.reshape(-1, 48).double() - ref).abs()
    assert (err <= 2**-21 * scale + 1e-7).all(), float(err.max())  # int32 -> float32, two products, the bias add
    assert torch.equal(y[0, 0], layer.bias)
    # against the unquantized activations: half a step per input, times sum |w| of the output
    exact = flat.double() @ w.T + layer.bias.double()
    bound = 0.5 * step.double() * w.abs().sum(1) + 2**-21 * scale + 1e-7
    assert ((y.reshape(-1, 48).double() - exact).abs() <= bound).all()
    with pytest.raises(ValueError, match="per-channel int8 codes"):
        QuantizedLinear(quantize_rtn(torch.randn(48, 96), 4, group_size=32), mode="dynamic")
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    fast = compress(model, [(".*", "rtn", 8)], runtime="dynamic").model
    assert [fast[i].kernel for i in (0, 2)] == ["int8-dynamic", "int8-dynamic"]
