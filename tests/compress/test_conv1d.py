"""Hugging Face GPT-2 ``Conv1D`` layers (weight stored ``(in, out)``) are compressed like the nn.Linear they are."""

import pytest
import torch
from torch import nn

from trainlab.compress import Plan, compress, compressible_layers
from trainlab.compress.export import load_model
from trainlab.compress.masks import get_mask
from trainlab.compress.quant.gptq import collect_hessians

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONV1D = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
          "transformer.h.0.mlp.c_proj"]  # fmt: skip


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 40, (2, 12), generator=g)} for _ in range(2)]


def test_conv1d_layers_are_compressible_and_the_tied_head_stays_tied():
    model = _gpt2()
    layers = compressible_layers(model)
    assert sorted(n for n, m in layers.items() if isinstance(m, Conv1D)) == sorted(CONV1D)
    assert "lm_head" in layers and "transformer.wte" not in layers
    result = compress(model, Plan([(".*", "rtn", 4)]), runtime="float")
    assert result.model.lm_head.weight is result.model.transformer.wte.weight
    runtime = compress(model, Plan([(".*", "rtn", 4)])).model  # the head on the kernel remembers its tie
    assert runtime.lm_head.tied == ("transformer.wte.weight",)
    back = compress(model, Plan([(".*", "rtn", 4)])).float_model()
    assert back.lm_head.weight is back.transformer.wte.weight


@pytest.mark.parametrize("level", [0.5, "2:4"])
def test_pruning_reaches_every_conv1d_in_its_input_groups(level):
    model = _gpt2()
    compressor = "magnitude" if isinstance(level, float) else "nm"
    out = compress(model, Plan([(".*", compressor, level)])).model
    for name in CONV1D:
        module = out.get_submodule(name)
        mask = get_mask(module)
        assert mask is not None and mask.shape == module.weight.shape
        assert (module.weight == 0).float().mean() == pytest.approx(0.5, abs=0.02)
        if level == "2:4":  # groups of 4 consecutive inputs of each output: along dim 0 of the (in, out) weight
            groups = mask.t().reshape(module.weight.shape[1], -1, 4).sum(-1)
            assert bool((groups == 2).all())


@pytest.mark.parametrize("second_order", [False, True], ids=["rtn", "gptq"])
def test_quantization_touches_every_conv1d_and_round_trips(second_order, tmp_path):
    model = _gpt2()
    batches = _batches()
    result = compress(model, Plan([(".*", "rtn", 3)]), calibration=batches, second_order=second_order, runtime=None)
    assert set(CONV1D) <= set(result.weights)
    for name in CONV1D:
        before, after = model.get_submodule(name).weight, result.model.get_submodule(name).weight
        assert not torch.equal(before, after)
        assert (after - before).abs().max() < before.abs().max() / 2
        for col in after.t():  # each output channel (a row of the (out, in) matrix) holds at most 8 values
            assert col.unique().numel() <= 8
    path = tmp_path / "m.safetensors"
    result.save(path)
    loaded = load_model(path, _gpt2, runtime=None)
    for key, value in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = batches[0]["input_ids"]
    assert torch.equal(loaded(ids).logits, result.model(ids).logits)


def test_pruned_and_quantized_conv1d_round_trip(tmp_path):
    model = _gpt2()
    result = compress(model, Plan([(".*", "nm", "2:4"), (".*", "rtn", 4)]), runtime=None)
    path = tmp_path / "m.safetensors"
    result.save(path)
    loaded = load_model(path, _gpt2, runtime=None)
    for name in CONV1D:
        assert torch.equal(loaded.get_submodule(name).weight, result.model.get_submodule(name).weight)
        assert torch.equal(get_mask(loaded.get_submodule(name)), get_mask(result.model.get_submodule(name)))


def test_conv1d_hessian_equals_the_equivalent_linear():
    torch.manual_seed(0)
    conv = Conv1D(6, 5).double()
    linear = nn.Linear(5, 6).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    assert torch.allclose(conv(x), linear(x))
    h_conv = collect_hessians(conv, [x], {"": conv})[""]
    h_lin = collect_hessians(linear, [x], {"": linear})[""]
    rows = x.reshape(-1, 5)
    assert torch.allclose(h_conv, 2 * rows.T @ rows / rows.shape[0])
    assert torch.equal(h_conv, h_lin)


def test_hf_export_refuses_conv1d_by_name(tmp_path):
    from trainlab.compress.hf_export import save_pretrained_compressed

    result = compress(_gpt2(), Plan([("transformer.h.0.mlp.c_fc", "rtn", 4)]))
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc' is a Hugging Face Conv1D"):
        save_pretrained_compressed(result.model, result.weights, tmp_path / "hf")


def test_bit_database_of_a_conv1d_is_the_transposed_linear_one():
    from trainlab.compress.quant.mixed import bit_database

    torch.manual_seed(0)
    conv, linear = Conv1D(6, 8).double(), nn.Linear(8, 6).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
    db_conv = bit_database(conv, [2, 3], layers={"": conv})[""]
    db_lin = bit_database(linear, [2, 3], layers={"": linear})[""]
    for b in (2, 3):
        assert db_conv[b].shape == conv.weight.shape
        assert torch.equal(db_conv[b].t(), db_lin[b])


def _lm_loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


SHORT = {"evopress": {"generations": 2, "offspring": 3}}


@pytest.mark.parametrize(
    ("allocator", "budget"),
    [("hawq", {"bits": 3}), ("evopress", {"bits": 3}), ("baq", {"bits": 3}), ("layer-adaptive", {"sparsity": 0.5})],
)
def test_calibrated_allocators_plan_every_conv1d(allocator, budget):
    from trainlab.compress import allocate_plan

    model, batches = _gpt2(), _batches()
    plan = allocate_plan(allocator, model, calibration=batches, loss=_lm_loss, **budget, **SHORT.get(allocator, {}))
    planned = {r.pattern for r in plan.rules}
    assert set(CONV1D) <= planned
    result = compress(model, plan, calibration=batches, loss=_lm_loss)
    assert not set(CONV1D) & set(result.report.dense)


def test_substituted_weight_on_a_conv1d_is_the_layer_with_that_weight():
    from trainlab.compress.calibrate import substituted_weight

    torch.manual_seed(0)
    conv, other = Conv1D(6, 8).double(), Conv1D(6, 8).double()
    other.bias = conv.bias
    x = torch.randn(4, 8, dtype=torch.float64)
    with substituted_weight(conv, other.weight.detach()):
        assert torch.equal(conv(x), other(x))


def test_sequential_gptq_measures_each_conv1d_on_its_own_inputs():
    model, batches = _gpt2(), _batches()
    result = compress(model, Plan([(".*", "rtn", 4)]), calibration=batches, second_order=True, sequential=True)
    assert set(CONV1D) <= set(result.hessians)
    for name in CONV1D:
        width = model.get_submodule(name).weight.shape[0]  # the Conv1D's inputs
        assert result.hessians[name].shape == (width, width)
