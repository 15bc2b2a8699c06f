"""Plans: exact names and regular expressions, later rules override, JSON round trip and exact replay."""

import copy

import pytest
import torch
from torch import nn

from trainlab.compress.masks import get_mask, mask_pattern
from trainlab.compress.plan import LayerRules, Plan, compressible_layers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.LayerNorm(32), nn.Linear(32, 8)
    )


def test_compressible_layers_are_linear_and_conv_only():
    assert list(compressible_layers(_model())) == ["0", "3", "5"]


def test_exact_name_regex_and_override_order():
    plan = Plan([(".*", "magnitude", 0.5), ("5", "magnitude", 0.0), ("[03]", "nm", "2:4")])
    assert plan.resolve(_model()) == {
        "0": LayerRules(("nm", "2:4"), None),
        "3": LayerRules(("nm", "2:4"), None),
        "5": LayerRules(("magnitude", 0.0), None),
    }


def test_overlapping_rules_give_each_layer_one_pruning_and_one_quantizer():
    plan = Plan([(".*", "rtn", 4), ("3", "nupes", 3.0), (".*", "magnitude", 0.5), ("[35]", "rtn", 2)])
    resolved = plan.resolve(_model())
    assert resolved == {
        "0": LayerRules(("magnitude", 0.5), ("rtn", 4)),
        "3": LayerRules(("magnitude", 0.5), ("rtn", 2)),
        "5": LayerRules(("magnitude", 0.5), ("rtn", 2)),
    }
    assert isinstance(Plan([(".*", "rtn", 4.0)]).rules[0].level, int)  # whole floats are bits


def test_exclude_and_levels_are_checked_against_the_registry():
    plan = Plan([(".*", "rtn", 4)])
    assert list(plan.resolve(_model(), exclude=["5", "[0]"])) == ["3"]
    with pytest.raises(ValueError, match="exclude pattern 'fc' matches no"):
        plan.resolve(_model(), exclude="fc")
    with pytest.raises(ValueError, match="bits"):
        Plan([(".*", "rtn", 4.5)])
    with pytest.raises(ValueError, match="one of \\(3,\\)"):
        Plan([(".*", "ptqtp", 4)])
    with pytest.raises(ValueError, match="sparsity"):
        Plan([(".*", "magnitude", 1.5)])
    with pytest.raises(ValueError, match="N:M"):
        Plan([(".*", "nm", "4:2")])
    with pytest.raises(ValueError, match="single rule"):
        Plan([(".*", "beta-rank", 0.5), ("3", "rtn", 4)])
    with pytest.raises(ValueError, match="compress\\(model, plan\\)"):
        Plan([(".*", "rtn", 4)]).apply(_model())


def test_rule_matching_nothing_and_unknown_compressor_are_errors():
    with pytest.raises(ValueError, match="matches no compressible layer"):
        Plan([("fc9", "magnitude", 0.5)]).resolve(_model())
    with pytest.raises(ValueError, match="unknown compressor 'magnitud'"):
        Plan([(".*", "magnitud", 0.5)])
    with pytest.raises(ValueError, match="list of \\[pattern, compressor, level\\]"):
        Plan.from_json('{"a": 1}')


def test_json_round_trip_replays_bit_for_bit():
    plan = Plan([(".*", "magnitude", 0.75), ("3", "nm", "1:4"), ("5", "magnitude", 0.3)])
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    a, b = _model(), _model()
    plan.apply(a)
    again.apply(b)
    for (name, la), lb in zip(compressible_layers(a).items(), compressible_layers(b).values(), strict=True):
        assert torch.equal(get_mask(la), get_mask(lb)), name
        assert torch.equal(la.weight, lb.weight)
    layers = compressible_layers(a)
    assert mask_pattern(layers["3"]) == "1:4"
    assert int(get_mask(layers["0"]).sum()) == 288 - round(0.75 * 288)
    assert int(get_mask(layers["5"]).sum()) == 256 - round(0.3 * 256)


def test_from_levels_uses_exact_names_with_dots():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    plan = Plan.from_levels("magnitude", {"blocks.0": 0.5, "blocks.1": 0.25})
    assert {k: r.prune for k, r in plan.resolve(model).items()} == {
        "blocks.0": ("magnitude", 0.5),
        "blocks.1": ("magnitude", 0.25),
    }
    plan.apply(model)
    assert [int(get_mask(m).sum()) for m in model.blocks] == [8, 12]
    replay = copy.deepcopy(model)
    assert torch.equal(replay.blocks[0].weight, model.blocks[0].weight)
