"""Conv2d where the method defines it (S2FT output channels, WeLore's rank-k + 1x1 split), refusals elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainlab.adapters as adapters

D = torch.float64


def convnet(groups: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2, groups=groups), nn.ReLU(), nn.Conv2d(8, 6, 1)).to(D)


def x() -> torch.Tensor:
    return torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1), dtype=D)


def test_s2ft_trains_whole_output_channels_of_a_conv() -> None:
    plain = convnet()
    model = adapters.attach(plain, "s2ft", targets=["0"], ratio=0.25)
    layer = model[0]
    assert len(layer.index) == 2 and layer.s2.shape == (2, 4 * 3 * 3)
    torch.testing.assert_close(model(x()), plain(x()), rtol=0, atol=0)
    with torch.no_grad():
        layer.s2.normal_()
    w = plain[0].weight.clone()
    w[layer.index] += layer.s2.view(2, 4, 3, 3)  # ΔW lives on the selected output channels only
    expected = plain[2](F.relu(F.conv2d(x(), w, plain[0].bias, stride=2, padding=1)))
    torch.testing.assert_close(model(x()), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapters.merged_copy(model)(x()), expected, rtol=0, atol=1e-12)
    assert adapters.count_trainable(model) == 2 * 36


def test_s2ft_conv_refuses_columns_and_groups() -> None:
    with pytest.raises(ValueError, match="side='rows'"):
        adapters.attach(convnet(), "s2ft", targets=["0"], side="columns")
    with pytest.raises(ValueError, match="groups=1"):
        adapters.attach(convnet(groups=2), "s2ft", targets=["0"])


def test_welore_factors_a_conv_into_rank_k_then_1x1(tmp_path) -> None:
    plain = convnet()
    model = adapters.attach(plain, "welore", targets=[nn.Conv2d], reduction=0.5)
    layer = model[0]
    k = layer.welore_U.shape[1]
    assert 1 <= k < 4 * 9 and layer.welore_V.shape == (k, 36) and layer.welore_U.shape == (8, k)
    u, s, vh = torch.linalg.svd(plain[0].weight.flatten(1))
    best = (u[:, :k] * s[:k]) @ vh[:k]  # the truncated SVD, as a conv kernel
    torch.testing.assert_close(layer.welore_U @ layer.welore_V, best)
    expected = F.conv2d(x(), best.view(8, 4, 3, 3), plain[0].bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x()), expected, rtol=0, atol=1e-12)
    merged = adapters.merged_copy(model)
    assert isinstance(merged[0], nn.Conv2d) and merged[0].stride == (2, 2)
    torch.testing.assert_close(merged(x()), model(x()), rtol=0, atol=1e-12)
    adapters.merge(model)
    torch.testing.assert_close(model(x()), merged(x()), rtol=0, atol=1e-12)
    adapters.unmerge(model)
    adapters.save_adapter(model, tmp_path)
    torch.testing.assert_close(adapters.load_adapter(plain, tmp_path)(x()), model(x()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="groups=1"):
        adapters.attach(convnet(groups=2), "welore", targets=["0"], reduction=0.5)


def test_bone_refuses_a_conv_naming_the_layer_and_the_method() -> None:
    with pytest.raises(TypeError, match=r"matched '0' \(Conv2d\), but bone adapts only linear, conv1d"):
        adapters.attach(convnet(), "bone", targets=["0"], r=4)
