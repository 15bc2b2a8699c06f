"""S2FT's coupled selection: co-permuted heads and FFN channels train as contiguous blocks (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainlab.adapters as adapters

D = torch.float64


class Block(nn.Module):
    """Multi-head self-attention (q, k, v -> o) then a gated FFN (up, gate -> down)."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 40) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.gate, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


COUPLE = "q,k,v>o:4;up,gate>down"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block()).to(D)


def x() -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), dtype=D)


def test_coupled_selection_is_contiguous_function_preserving_and_merges_exactly() -> None:
    plain = model()
    torch.manual_seed(2)
    tuned = adapters.attach(plain, "s2ft", targets=["q", "v", "o", "up", "down"], ratio=0.25, couple=COUPLE)
    torch.testing.assert_close(tuned(x()), plain(x()), rtol=0, atol=1e-13)  # permutation + zero blocks: unchanged
    layers = adapters.adapter_layers(tuned)
    for i in (0, 1):
        blocks = {n.rpartition(".")[2]: layers[n] for n in layers if n.startswith(f"{i}.")}
        # pooled draw: 0.25 of 2 x 4 heads (rows of q, v; columns of o) and 2 x 40 channels
        assert {name: layer.side for name, layer in blocks.items()} == {
            "q": "rows", "v": "rows", "o": "columns", "up": "rows", "down": "columns"
        }  # fmt: skip
        for layer in blocks.values():
            start, stop = layer.block
            assert torch.equal(layer.index, torch.arange(start, stop))
        assert blocks["q"].block[0] == 0 and blocks["up"].block[0] == 0
        assert blocks["q"].block[1] % 4 == 0 and blocks["o"].block[0] % 4 == 0  # whole heads
    assert not torch.equal(tuned[0].up.base.weight, plain[0].up.weight)  # the channels were really reordered
    total_heads = sum(layers[f"{i}.q"].block[1] // 4 for i in (0, 1))
    total_up = sum(layers[f"{i}.up"].block[1] for i in (0, 1))
    assert total_heads == 2 and total_up == 20
    with torch.no_grad():
        for p in adapters.trainable_parameters(tuned):
            p.normal_(std=0.1)
    y = tuned(x())
    assert (y - plain(x())).abs().max() > 1e-3
    for layer in layers.values():  # the block is the only part of ΔW that is non-zero
        delta = layer.delta_weight(layer.base_weight())
        start, stop = layer.block
        outside = delta.clone().detach()
        (outside[start:stop] if layer.side == "rows" else outside[:, start:stop]).zero_()
        assert not outside.any()
        assert torch.equal(delta[start:stop] if layer.side == "rows" else delta[:, start:stop], layer.s2)
    adapters.merge(tuned)
    torch.testing.assert_close(tuned(x()), y, rtol=0, atol=1e-12)
    adapters.unmerge(tuned)
    torch.testing.assert_close(adapters.merged_copy(tuned)(x()), y, rtol=0, atol=1e-12)


def test_merged_copy_puts_the_channels_back_in_the_original_order() -> None:
    plain = model()
    tuned = adapters.attach(plain, "s2ft", targets=["q", "v", "o", "up", "down"], ratio=0.25, couple=COUPLE)
    merged = adapters.merged_copy(tuned)
    assert all(
        torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        tuned[0].up.s2.fill_(1.0)
    merged = adapters.merged_copy(tuned)
    torch.testing.assert_close(merged(x()), tuned(x()), rtol=0, atol=1e-12)
    changed = (merged[0].up.weight != plain[0].up.weight).any(1)
    order = adapters.adapter_info(tuned)["permutations"]["0.up"]["rows"]
    start, stop = tuned[0].up.block
    assert changed.nonzero().flatten().tolist() == sorted(order[start:stop])  # the selected original channels


def test_coupled_adapter_round_trips_onto_the_plain_base(tmp_path) -> None:
    plain = model()
    tuned = adapters.attach(plain, "s2ft", targets=["up", "down"], ratio=0.3, couple="up,gate>down")
    with torch.no_grad():
        for p in adapters.trainable_parameters(tuned):
            p.normal_(std=0.1)
    adapters.save_adapter(tuned, tmp_path)
    torch.manual_seed(123)  # another seed: the selection and the permutation come from the file
    again = adapters.load_adapter(plain, tmp_path)
    torch.testing.assert_close(again(x()), tuned(x()), rtol=0, atol=1e-13)
    assert adapters.count_trainable(again) == adapters.count_trainable(tuned)


def test_training_changes_only_the_blocks() -> None:
    plain = model()
    tuned = adapters.attach(plain, "s2ft", targets=["up", "down"], ratio=0.2, couple="up,gate>down")
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    opt = torch.optim.SGD(adapters.trainable_parameters(tuned), lr=0.1)
    tuned(x()).pow(2).mean().backward()
    opt.step()
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{i}.{n}.s2" for i in (0, 1) for n in ("up", "down")}


def test_bad_couple_strings_raise_naming_the_option() -> None:
    for bad in ("up,gate", "up>down:0", ">down", "up>down:x"):
        with pytest.raises(ValueError, match="couple"):
            adapters.attach(model(), "s2ft", targets=["up"], couple=bad)
    with pytest.raises(ValueError, match="matches no module"):
        adapters.attach(model(), "s2ft", targets=["up"], couple="fc1>fc2")
    with pytest.raises(ValueError, match="multiple of the unit width"):
        adapters.attach(model(), "s2ft", targets=["up"], couple="up,gate>down:3")


def test_a_layer_between_two_structures_is_permuted_on_both_axes(tmp_path) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).to(D)
    inputs = torch.randn(5, 6, dtype=D)
    tuned = adapters.attach(plain, "s2ft", targets=["0", "4"], ratio=0.5, couple="0>2;2>4")
    torch.testing.assert_close(tuned(inputs), plain(inputs), rtol=0, atol=1e-13)
    assert set(adapters.adapter_info(tuned)["permutations"]["2"]) == {"rows", "columns"}
    with torch.no_grad():
        for p in adapters.trainable_parameters(tuned):
            p.normal_()
    adapters.save_adapter(tuned, tmp_path)
    torch.testing.assert_close(adapters.load_adapter(plain, tmp_path)(inputs), tuned(inputs), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="both its rows and its columns"):
        adapters.attach(plain, "s2ft", targets=["2"], couple="0>2;2>4")
