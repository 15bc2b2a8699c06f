"""Structured pruning: exact slicing, Beta-Rank against its loop definition, PreCropping widths, file round trips."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from trainlab.compress.structured import (
    beta_rank_scores,
    load_structured,
    parameter_count,
    precrop_widths,
    prunable_layers,
    save_structured,
    slice_channels,
    structured_prune,
    synflow_densities,
)
from trainlab.lab.workloads import get_workload


def _model(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    return get_workload(name).make_model()


def _bn_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 12),
        nn.BatchNorm1d(12),
        nn.Tanh(),
        nn.Dropout(0.1),
        nn.Linear(12, 3),
    )
    for mod in model:
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.5, 0.5)
    return model.eval()


def _random_keep(model: nn.Sequential, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for i in prunable_layers(model):
        c = model[i].weight.shape[0]
        keep[i] = torch.randperm(c, generator=gen)[: max(1, c // 2 - 1)]
    return keep


def _masked(model: nn.Sequential, keep: dict[int, torch.Tensor]) -> nn.Sequential:
    """The masked model in float64: each dropped channel's consumer (next Conv2d/Linear) ignores it (zero columns;
    after Flatten, the channel's block of H·W features). Written independently of slice_channels."""
    masked = copy.deepcopy(model).double()
    for i, kept in keep.items():
        drop = torch.ones(model[i].weight.shape[0], dtype=torch.bool)
        drop[kept] = False
        consumer = next(m for m in masked[i + 1 :] if isinstance(m, nn.Conv2d | nn.Linear))
        with torch.no_grad():
            w = consumer.weight.view(consumer.weight.shape[0], len(drop), -1)  # (out, C, H·W or k·k)
            w[:, drop] = 0.0
    return masked


@pytest.mark.parametrize("make", [lambda: _model("digits-cnn"), lambda: _model("digits-mlp"), _bn_cnn])
def test_sliced_model_equals_masked_model_float64(make):
    model = make()
    keep = _random_keep(model)
    masked = _masked(model, keep)
    sliced = slice_channels(masked, keep)
    x = torch.rand(32, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected, got = masked(x), sliced(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert (model.double()(x) - expected).abs().max() > 1e-3  # the masking changed the function: a real check


def test_parameter_counts_after_slicing_are_exact():
    model = _bn_cnn()  # conv(1→6,3x3) bn conv(6→8,3x3,s2) bn flatten linear(72→12) bn1d linear(12→3)
    sliced = slice_channels(model, {0: torch.tensor([0, 2, 4]), 3: torch.tensor([1, 7]), 7: torch.arange(5)})
    conv1 = 3 * 1 * 9 + 3
    bn1 = 2 * 3
    conv2 = 2 * 3 * 9 + 2
    bn2 = 2 * 2
    fc1 = 5 * (2 * 9) + 5
    bn3 = 2 * 5
    head = 3 * 5 + 3
    assert parameter_count(sliced) == conv1 + bn1 + conv2 + bn2 + fc1 + bn3 + head
    assert [tuple(p.shape) for p in sliced.parameters()][:3] == [(3, 1, 3, 3), (3,), (3,)]
    cnn = _model("digits-cnn")  # conv(1→16) conv(16→32) pool flatten linear(512→10): 50% of both convs
    half = slice_channels(cnn, {0: torch.arange(8), 2: torch.arange(16)})
    assert parameter_count(cnn) == (16 * 9 + 16) + (32 * 16 * 9 + 32) + (10 * 512 + 10) == 9930
    assert parameter_count(half) == (8 * 9 + 8) + (16 * 8 * 9 + 16) + (10 * 256 + 10) == 3818


def test_flatten_index_mapping_and_widths():
    model = _model("digits-cnn")
    sliced = slice_channels(model, {0: torch.tensor([3, 1]), 2: torch.tensor([5, 0, 31])})
    assert [sliced[0].out_channels, sliced[2].in_channels, sliced[2].out_channels] == [2, 2, 3]
    assert sliced[6].in_features == 3 * 16
    w = model[6].weight.view(10, 32, 16)
    torch.testing.assert_close(sliced[6].weight, w[:, [0, 5, 31]].reshape(10, 48), rtol=0, atol=0)


def test_beta_rank_matches_its_loop_definition():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    x = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    got = beta_rank_scores(model, [x])[0]
    out = conv(x).detach()
    padded = F.pad(x, (1, 1, 1, 1))
    expected = torch.zeros(3, dtype=torch.float64)
    for j in range(3):
        acc = torch.zeros_like(conv.weight[j])
        for u in range(out.shape[2]):
            for v in range(out.shape[3]):
                a = out[:, j, u, v].std(unbiased=False)
                b = padded[:, :, 2 * u : 2 * u + 3, 2 * v : 2 * v + 3].std(unbiased=False)
                acc += (conv.weight[j].detach() * a / b).abs()
        expected[j] = acc.mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_beta_rank_prune_keeps_top_scores_per_layer():
    model = _model("digits-cnn")
    x = torch.rand(64, 1, 8, 8)
    scores = beta_rank_scores(model, [x])
    pruned = structured_prune(model, "beta-rank", 0.5, [x])
    assert [pruned[0].out_channels, pruned[2].out_channels] == [8, 16]
    top = torch.topk(scores[0], 8).indices.sort().values
    torch.testing.assert_close(pruned[0].weight, model[0].weight[top], rtol=0, atol=0)


def test_precrop_widths_follow_synflow_densities():
    model = _model("digits-mlp")
    x = torch.rand(4, 1, 8, 8)
    d = synflow_densities(model, 0.3, x)
    sizes = {i: model[i].weight.numel() for i in d}
    assert sizes == {1: 64 * 128, 3: 128 * 128, 5: 128 * 10}
    # iterative SynFlow ends at exactly round(0.3 · total) kept weights (no ties among float64 scores)
    assert round(sum(d[i] * sizes[i] for i in d)) == round(0.3 * sum(sizes.values()))
    widths = precrop_widths(model, 0.7, x)
    a1 = min(1.0, d[1])
    assert widths[1] == max(1, round(a1 * 128))
    assert widths[3] == max(1, min(128, round(min(1.0, d[3] / (widths[1] / 128)) * 128)))
    pruned = structured_prune(model, "precrop", 0.7, [x])
    assert [pruned[1].out_features, pruned[3].out_features, pruned[5].out_features] == [widths[1], widths[3], 10]
    assert parameter_count(pruned) == pytest.approx(0.3 * parameter_count(model), rel=0.25)


@pytest.mark.parametrize("method", ["beta-rank", "precrop"])
def test_save_load_round_trip_and_file_size(tmp_path, method):
    model = _model("digits-cnn")
    x = torch.rand(16, 1, 8, 8)
    pruned = structured_prune(model, method, 0.5, [x])
    save_structured(model, tmp_path / "dense.safetensors")
    save_structured(pruned, tmp_path / "pruned.safetensors")
    loaded = load_structured(tmp_path / "pruned.safetensors")
    torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
    ratio = (tmp_path / "pruned.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio == pytest.approx(parameter_count(pruned) / parameter_count(model), abs=0.03)
    if method == "beta-rank":
        assert ratio <= 0.5  # conv2 and the head lose inputs too: at least the pruned fraction
    bn = _bn_cnn().double()  # BatchNorm buffers and float64 survive the file
    save_structured(bn, tmp_path / "bn.safetensors")
    back = load_structured(tmp_path / "bn.safetensors").eval()
    assert all(p.dtype == torch.float64 for p in back.parameters())
    torch.testing.assert_close(back(x.double()), bn(x.double()), rtol=0, atol=0)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by save_structured"):
        load_structured(tmp_path / "plain.safetensors")


def test_bad_arguments():
    model = _model("digits-cnn")
    x = [torch.rand(4, 1, 8, 8)]
    with pytest.raises(ValueError, match="method must be one of beta-rank, precrop"):
        structured_prune(model, "l1", 0.5, x)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            structured_prune(model, "beta-rank", bad, x)
    with pytest.raises(ValueError, match="calibration"):
        structured_prune(model, "beta-rank", 0.5, [])
    with pytest.raises(ValueError, match="does not support layer '1'"):
        structured_prune(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), "beta-rank", 0.5, x)
    with pytest.raises(ValueError, match="nn.Sequential"):
        structured_prune(nn.ModuleList([nn.Linear(64, 10)]), "precrop", 0.5, x)
    with pytest.raises(ValueError, match="groups=1"):
        structured_prune(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), "beta-rank", 0.5, x)
    with pytest.raises(ValueError, match="non-prunable"):
        slice_channels(model, {6: torch.tensor([0])})
