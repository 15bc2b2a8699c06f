"""compress(model, plan) and allocate_plan: any nn.Module (Hugging Face included), the caller's model untouched,
one pruning and one quantizer per layer, exclusions, second order reaching the allocators, and bad input."""

import copy

import pytest
import torch
from torch import nn

from trainlab.compress import Plan, allocate_plan, compress, compressible_layers
from trainlab.compress.export import load_model
from trainlab.compress.masks import get_mask
from trainlab.compress.quant import mixed
from trainlab.compress.quant.apply import quantize_model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(16, 64), nn.Linear(64, 16), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.block, self.head = nn.Linear(8, 16), Block(), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(64, 8, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(n)]


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _state(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
    )


def test_the_callers_model_is_untouched_modes_and_flags_included():
    model = Net()
    model.train()
    model.block.eval()  # mixed modes: a frozen block in eval mode under a training head
    model.embed.weight.requires_grad_(False)
    before = _state(model)
    calib = _batches()
    plan = Plan([(".*", "magnitude", 0.5), ("block.fc1", "gwq", 3), ("head", "rtn", 4)])
    result = compress(model, plan, calibration=calib, loss=_loss, second_order=True)
    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]
    assert _state(result.float_model())[1:] == before[1:]  # the copy keeps the modes and flags too
    assert [m.training for m in result.model.modules()] == [m.training for m in model.modules()]
    assert get_mask(model.head) is None and get_mask(result.float_model().head) is not None
    assert result.second_order and set(result.hessians) == {"block.fc1", "head"}


def test_pruned_then_quantized_layers_stack_deliberately(tmp_path):
    model, calib = Net(), _batches()
    plan = Plan([(".*", "rtn", 8), (".*", "magnitude", 0.6), ("head", "rtn", 3)])  # head: one quantizer, 3 bits
    result = compress(model, plan, calibration=calib, runtime="float")
    head = result.model.head
    assert result.bits["head"] == 3 and result.weights["head"].bits == 3
    assert int((head.weight == 0).sum()) == round(0.6 * head.weight.numel())
    assert torch.equal(head.weight == 0, ~get_mask(head))
    assert torch.equal(result.weights["head"].dequantize(torch.float32), head.weight)  # 0 is on the RTN grid
    path = tmp_path / "stacked.safetensors"
    result.save(path)
    reloaded = load_model(path, Net, runtime="float")
    assert torch.equal(get_mask(reloaded.head), get_mask(head)) and torch.equal(reloaded.head.weight, head.weight)
    again = compress(
        model, plan, calibration=calib, second_order=True, runtime=None
    )  # GPTQ moves pruned entries: re-masked
    assert int((again.model.head.weight == 0).sum()) == round(0.6 * head.weight.numel())
    assert "cleared by the mask" in again.report.layers["head"].note


def test_exclude_leaves_layers_dense_and_the_report_says_why():
    model = Net()
    result = compress(model, [(".*", "magnitude", 0.5)], exclude=[r"block\..*"])
    assert result.report.dense == {"block.fc1": "excluded", "block.fc2": "excluded"}
    assert torch.equal(result.model.block.fc1.weight, model.block.fc1.weight)
    assert set(result.report.layers) == {"embed", "head"}
    only = compress(model, [("head", "rtn", 4)])
    assert only.report.dense == {"embed": "no plan rule", "block.fc1": "no plan rule", "block.fc2": "no plan rule"}
    plan = allocate_plan("global", model, sparsity=0.8, exclude="head")
    assert {r.pattern for r in plan.rules} == {"embed", "block.fc1", "block.fc2"}
    sizes = {k: m.weight.numel() for k, m in compressible_layers(model).items() if k != "head"}
    zeros = sum(int((m.weight == 0).sum()) for m in compressible_layers(compress(model, plan).model).values())
    assert zeros == round(0.8 * sum(sizes.values()))
    assert "excluded" in str(compress(model, plan, exclude="head").report)


def test_second_order_reaches_the_bit_allocators(monkeypatch):
    model, calib = Net(), _batches()
    seen = []
    real = mixed.bit_database

    def spy(*args, **kwargs):
        seen.append(kwargs.get("hessians") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed, "bit_database", spy)
    for allocator in ("hawq", "evopress"):
        extra = {"generations": 1, "offspring": 2} if allocator == "evopress" else {}
        for second in (False, True):
            plan = allocate_plan(allocator, model, bits=3, calibration=calib, second_order=second, **extra)
            assert seen.pop() is second
            assert {r.compressor for r in plan.rules} == {"rtn"}
    with pytest.raises(ValueError, match="second_order applies to bit allocators"):
        allocate_plan("uniform", model, sparsity=0.5, second_order=True)


def test_hawq_measures_the_users_loss_when_given_one():
    model, calib = Net(), _batches()
    calls = []

    def loss(m, batch):
        calls.append(len(batch[0]))
        return _loss(m, batch)

    plan = allocate_plan("hawq", model, bits=3, calibration=calib, loss=loss, hessian_batches=2)
    assert calls and set(calls) == {64}  # the sensitivities differentiate the user's loss on the batches
    sizes = {k: m.weight.numel() for k, m in compressible_layers(model).items()}
    assert sum(r.level * sizes[r.pattern] for r in plan.rules) == 3 * sum(sizes.values())


def test_baq_plan_then_compress_is_baq():
    model, calib = Net(), _batches()
    plan = allocate_plan("baq", model, bits=3, calibration=calib, exclude="embed")
    result = compress(model, plan, calibration=calib, runtime="float")
    hessians = mixed.collect_hessians(model, calib, {"head": model.head})
    ref = mixed.baq_quantize(model.head.weight.detach(), hessians["head"], 3)
    assert torch.equal(result.model.head.weight, ref.weight)
    assert plan.rules[-1].level == ref.bits.tolist()
    with pytest.raises(ValueError, match="its own per-column grid"):
        allocate_plan("baq", model, bits=3, calibration=calib, compressor="rtn")


def test_quantize_model_is_compress_with_one_quantizer():
    model, calib = Net(), _batches()
    a = quantize_model(model, "rtn", 3, second_order=True, calibration=calib)
    b = compress(model, [(".*", "rtn", 3)], calibration=calib, second_order=True)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Hugging Face models: keyword batches, ModelOutput results


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _hf_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 64, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
        for _ in range(2)
    ]


def test_hugging_face_model_with_dict_batches(bert):
    before = _state(bert)
    calib = _hf_batches()
    plan = allocate_plan("hawq", bert, bits=3, calibration=calib, exclude="pooler.dense")
    result = compress(bert, plan, calibration=calib, second_order=True, exclude="pooler.dense")
    after = _state(bert)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]
    assert result.report.mean_bits == pytest.approx(3) and "pooler.dense" in result.report.dense
    assert not result.model.training  # the quantized copy stays in eval mode: no dropout at inference
    dense = bert(**calib[0]).last_hidden_state
    quantized = result.model(**calib[0]).last_hidden_state
    assert torch.equal(quantized, result.model(**calib[0]).last_hidden_state)
    cos = nn.functional.cosine_similarity(dense.flatten(1), quantized.flatten(1)).min()
    assert 0.5 < cos < 1.0


# ---------------------------------------------------------------------------------------------------------
# bugs


def test_nan_or_inf_weight_raises_naming_the_layer():
    for bad in (float("nan"), float("inf")):
        model = Net()
        with torch.no_grad():
            model.block.fc2.weight[3, 4] = bad
        with pytest.raises(ValueError, match="layer 'block.fc2' has NaN or inf"):
            compress(model, [(".*", "rtn", 4)])
        with pytest.raises(ValueError, match="layer 'block.fc2' has NaN or inf"):
            allocate_plan("global", model, sparsity=0.5)
        compress(model, [(".*", "rtn", 4)], exclude="block.fc2")  # excluded: left as it is


def test_whole_float_bits_are_accepted_and_fractional_ones_named():
    model = Net()
    a, b = compress(model, [(".*", "rtn", 4.0)]), compress(model, [(".*", "rtn", 4)])
    assert a.bits == b.bits == dict.fromkeys(a.bits, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    assert quantize_model(model, "rtn", 4.0).bits == a.bits
    with pytest.raises(ValueError, match="bits.*whole number of bits.*3.5"):
        quantize_model(model, "rtn", 3.5)
    with pytest.raises(ValueError, match="bits.*whole number"):
        allocate_plan("uniform", model, bits=3.5)


def test_a_model_without_linear_or_conv_layers_is_refused_clearly():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="Sequential has no nn.Linear, nn.Conv1d or nn.Conv2d layer"):
        compress(model, [(".*", "rtn", 4)])
    with pytest.raises(ValueError, match="has no nn.Linear"):
        allocate_plan("hawq", model, bits=3, calibration=[torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="has no nn.Linear"):
        quantize_model(model, "rtn", 4)


def test_nm_reports_real_sparsity_and_names_the_layers_it_left_dense():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.warns(UserWarning, match="not a multiple of M"):
        result = compress(model, [(".*", "nm", "2:4")])
    assert result.report.dense == {"4": "nm 2:4: input size 6 is not a multiple of M=4"}
    pruned = 0.5 * (8 * 16 + 16 * 6)
    assert result.report.sparsity == pytest.approx(pruned / (8 * 16 + 16 * 6 + 6 * 4))
    assert torch.equal(result.model[4].weight, model[4].weight)


def test_compress_any_model_example_from_the_docs():
    """The "compress any model in Python" example of docs/compression.md, run as written there."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "compression.md").read_text()
    block = re.search(r"<!-- example: compress-any-model -->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "docs/compression.md lost its compress-any-model example"
    scope: dict = {}
    exec(compile(block.group(1), "docs/compression.md", "exec"), scope)  # noqa: S102 (our own docs)
    assert scope["result"].report.mean_bits == pytest.approx(3.0)
    assert copy.deepcopy(scope["result"].model) is not None
