"""compress() and load_model() give QuantizedLinear layers by default (issue 12: "compress returns a model whose
quantized layers are these modules; load rebuilds them"); runtime="float" / None keeps nn.Linear; saving from a
runtime model writes the same file as from the float form; ties, masks, modes and flags survive the round trip."""

import pytest
import torch
from torch import nn

from trainlab.compress import compress
from trainlab.compress.embeddings import quantize_embeddings
from trainlab.compress.export import load_model
from trainlab.compress.masks import get_mask, mask_pattern
from trainlab.compress.quantized_linear import QuantizedLinear, float_model


class TiedLM(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.hidden = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.hidden(self.embed(ids))))


IDS = torch.arange(24).reshape(2, 12)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _contents(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}  # noqa: SIM118


def test_compress_returns_quantized_linear_layers_that_say_their_path():
    model = _mlp()
    result = compress(model, [(".*", "rtn", 4)], group_size=32)
    assert isinstance(result.model[0], QuantizedLinear) and isinstance(result.model[2], QuantizedLinear)
    assert (result.model[0].kernel, result.model[0].reason) == ("int4", "int4 kernel, group 32")
    # 10 outputs: no int4 kernel; groups of 32: no per-channel int8 kernel either; the reason names both
    assert result.model[2].kernel == "dequantize" and "not divisible by 16" in result.model[2].reason
    assert "per output channel" in result.model[2].reason
    assert result.runtime == "auto" and isinstance(model[0], nn.Linear)  # the caller's model is untouched
    for off in (None, "float"):
        flat = compress(model, [(".*", "rtn", 4)], group_size=32, runtime=off)
        assert flat.runtime == "float" and type(flat.model[0]) is nn.Linear
    x = torch.randn(3, 64)
    torch.testing.assert_close(result.model(x), flat.model(x), rtol=2e-2, atol=2e-2)  # bfloat16 activations
    assert torch.equal(result.float_model()(x), flat.model(x))  # the float form is exactly compress's float model
    assert result.quantized_weight_count() == flat.quantized_weight_count() == 64 * 64 + 64 * 10
    with pytest.raises(ValueError, match="runtime must be one of"):
        compress(model, [(".*", "rtn", 4)], runtime="fast")


def test_save_from_the_runtime_model_writes_the_float_forms_file_and_load_rebuilds_the_kernels(tmp_path):
    model = _mlp()
    fast = compress(model, [(".*", "rtn", 4)], group_size=32)
    flat = compress(model, [(".*", "rtn", 4)], group_size=32, runtime="float")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert fast.save(a) == flat.save(b)
    assert _contents(a) == _contents(b)  # the same tensors and metadata (the header's key order may differ)
    loaded = load_model(a, _mlp)
    assert [type(loaded[i]).__name__ for i in (0, 2)] == ["QuantizedLinear", "QuantizedLinear"]
    assert loaded[0].kernel == "int4"
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), fast.model(x))
    assert torch.equal(load_model(a, _mlp, runtime=None)(x), flat.model(x))
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_model(a, _mlp, runtime="int4")


def test_a_tied_head_runs_on_the_kernel_and_is_stored_once(tmp_path):
    fast = compress(TiedLM(), [("hidden|lm_head", "rtn", 4)])
    assert fast.model.lm_head.kernel == "int4" and fast.model.lm_head.tied == ("embed.weight",)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    size = fast.save(a)
    assert size == compress(TiedLM(), [("hidden|lm_head", "rtn", 4)], runtime=None).save(b)
    back = float_model(fast.model)
    assert back.lm_head.weight is back.embed.weight
    loaded = load_model(a, TiedLM)
    assert loaded.lm_head.tied == ("embed.weight",)
    assert torch.equal(loaded(IDS), fast.model(IDS))
    plain = load_model(a, TiedLM, runtime="float")
    assert plain.lm_head.weight is plain.embed.weight


def test_pruned_and_quantized_layers_keep_mask_and_pattern_through_the_runtime_model(tmp_path):
    model = _mlp()
    plan = [("0", "nm", "2:4"), ("0", "rtn", 4)]
    fast = compress(model, plan, group_size=32)
    flat = compress(model, plan, group_size=32, runtime="float")
    back = fast.float_model()[0]
    assert torch.equal(get_mask(back), get_mask(flat.model[0])) and mask_pattern(back) == "2:4"
    path = tmp_path / "m.safetensors"
    fast.save(path)
    reloaded = load_model(path, _mlp, runtime="float")
    assert torch.equal(reloaded[0].weight, flat.model[0].weight) and mask_pattern(reloaded[0]) == "2:4"


def test_float64_layers_keep_float64_precision_and_modes_and_flags_survive():
    model = _mlp().double()
    model[0].eval()
    model[2].weight.requires_grad_(False)
    fast = compress(model, [(".*", "rtn", 4)], group_size=32)
    assert fast.model[0].kernel == "cached" and "float64" in fast.model[0].reason
    flat = compress(model, [(".*", "rtn", 4)], group_size=32, runtime=None)
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.equal(fast.model(x), flat.model(x))
    back = fast.float_model()
    assert [m.training for m in back.modules()] == [m.training for m in model.modules()]
    assert [p.requires_grad for p in back.parameters()] == [p.requires_grad for p in model.parameters()]


def test_embedding_quantization_of_a_runtime_result_keeps_the_kernels():
    result = quantize_embeddings(compress(TiedLM(tie=False), [("hidden|lm_head", "rtn", 4)]), 4)
    assert isinstance(result.model.lm_head, QuantizedLinear) and "embed" in result.weights
    assert isinstance(result.model.embed, nn.Embedding)


def test_a_kernel_layer_moved_off_the_cpu_says_what_to_do():
    layer = compress(_mlp(), [(".*", "rtn", 4)], group_size=32).model[0]
    with pytest.raises(RuntimeError, match="runs on the CPU, the input is on meta"):
        layer(torch.empty(2, 64, device="meta"))
