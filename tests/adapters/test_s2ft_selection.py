"""S2FT's selection strategies: the chosen rows/columns are the top-k units by the stated score (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trainlab.adapters as adapters
from trainlab.adapters.s2ft import SELECTIONS

D = torch.float64
HIDDEN, HEADS, WIDTH = 24, 4, 3  # FFN channels; attention-like heads of 3 channels


class Toy(nn.Module):
    """Two coupled structures: a tanh FFN (up > down) and head-structured projections (v > o, heads of 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, HIDDEN), nn.Linear(HIDDEN, 8)
        self.v, self.o = nn.Linear(8, HEADS * WIDTH), nn.Linear(HEADS * WIDTH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(torch.tanh(self.up(x)))
        return self.o(torch.relu(self.v(h)))


def toy() -> nn.Module:
    torch.manual_seed(0)
    model = Toy().to(D)
    with torch.no_grad():  # channels of clearly different sizes, so the rankings have no near-ties
        model.up.weight.mul_(torch.linspace(0.2, 3.0, HIDDEN, dtype=D)[torch.randperm(HIDDEN)][:, None])
        model.down.weight.mul_(torch.linspace(0.2, 3.0, HIDDEN, dtype=D)[torch.randperm(HIDDEN)])
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 8, generator=g, dtype=D), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)]


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


COUPLE, RATIO = "up>down;v>o:3", 0.25
TARGETS = ["up", "down", "v", "o"]


def reference_scores(model: nn.Module, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row scores, column scores) pooled over [FFN channels, heads], straight from the definitions."""
    ffn_rows = model.up.weight.pow(2).sum(1)
    ffn_cols = model.down.weight.pow(2).sum(0)
    head_rows = model.v.weight.pow(2).sum(1).view(HEADS, WIDTH).sum(1)
    head_cols = model.o.weight.pow(2).sum(0).view(HEADS, WIDTH).sum(1)
    weight = torch.cat([ffn_rows, head_rows]), torch.cat([ffn_cols, head_cols])
    if score == "weight":
        return weight
    acts: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, a, k=k: acts.setdefault(k, []).append(a[0]))
               for k, m in (("down", model.down), ("o", model.o))]  # fmt: skip
    grads = [torch.zeros_like(m.weight) for m in (model.up, model.down, model.v, model.o)]
    for batch in batches():
        for total, g in zip(grads, torch.autograd.grad(loss(model, batch), [m.weight for m in (model.up, model.down,
                            model.v, model.o)]), strict=True):  # fmt: skip
            total += g / 3
    for h in handles:
        h.remove()
    rms = {k: torch.cat(v).pow(2).mean(0) for k, v in acts.items()}
    activation = torch.cat([rms["down"].sqrt(), rms["o"].view(HEADS, WIDTH).sum(1).sqrt()])
    if score == "activation":
        return activation, activation
    if score == "scaled":
        return weight[0].sqrt() * activation, weight[1].sqrt() * activation
    up, down, v, o = grads
    return (
        torch.cat([up.pow(2).sum(1), v.pow(2).sum(1).view(HEADS, WIDTH).sum(1)]),
        torch.cat([down.pow(2).sum(0), o.pow(2).sum(0).view(HEADS, WIDTH).sum(1)]),
    )


def chosen_units(tuned: nn.Module) -> tuple[set[int], set[int]]:
    """Pooled indices (FFN channels 0..23, then heads 24..27) of the rows and columns that train, read back from
    the recorded permutations and each layer's block."""
    info = tuned._trainlab_adapter["permutations"]
    layers = adapters.adapter_layers(tuned)
    rows, cols = set(), set()
    for producer, consumer, offset, unit in (("up", "down", 0, 1), ("v", "o", HIDDEN, WIDTH)):
        for name, side, out in ((producer, "rows", rows), (consumer, "columns", cols)):
            start, stop = layers[name].block
            order = info[name][side]
            out |= {offset + order[i] // unit for i in range(start, stop, unit)}
    return rows, cols


@pytest.mark.parametrize("selection", [s for s in SELECTIONS if s != "random"])
def test_selection_takes_the_top_k_by_its_score_and_keeps_the_function(selection) -> None:
    model = toy()
    score, _, end = selection.rpartition("-")
    expected_rows, expected_cols = reference_scores(copy.deepcopy(model), score)
    tuned = adapters.attach(model, "s2ft", targets=TARGETS, couple=COUPLE, ratio=RATIO, selection=selection,
                            batches=batches(), loss=loss)  # fmt: skip
    k = round(RATIO * (HIDDEN + HEADS))  # pooled over the 24 channels and 4 heads: 7 units per role
    top = {i: set(torch.topk(s, k, largest=end == "large").indices.tolist()) for i, s in
           enumerate((expected_rows, expected_cols))}  # fmt: skip
    assert chosen_units(tuned) == (top[0], top[1])
    x = batches()[0][0]
    torch.testing.assert_close(tuned(x), model(x), rtol=0, atol=1e-13)  # co-permutation + zero blocks: unchanged
    with torch.no_grad():
        for p in adapters.trainable_parameters(tuned):
            p.normal_()
    plain = adapters.merged_copy(tuned)  # undoes the permutation: trained blocks land on the chosen channels
    torch.testing.assert_close(plain(x), tuned(x), rtol=0, atol=1e-11)
    changed_rows = (plain.up.weight != model.up.weight).any(1).nonzero().flatten().tolist()
    assert set(changed_rows) == {u for u in top[0] if u < HIDDEN}


def test_large_and_small_are_complementary_and_differ_from_random() -> None:
    def pick(selection: str) -> tuple[set[int], set[int]]:
        torch.manual_seed(5)
        return chosen_units(adapters.attach(toy(), "s2ft", targets=TARGETS, couple=COUPLE, ratio=RATIO,
                                            selection=selection))  # fmt: skip

    large, small = pick("weight-large"), pick("weight-small")
    assert not large[0] & small[0] and not large[1] & small[1]
    assert pick("random") == pick("random") and pick("random") not in (large, small)


def test_data_selections_need_data_and_couple() -> None:
    with pytest.raises(ValueError, match="selection='gradient-large' scores channels on data: pass batches="):
        adapters.attach(toy(), "s2ft", targets=TARGETS, couple=COUPLE, selection="gradient-large")
    with pytest.raises(ValueError, match="name the structures with couple="):
        adapters.attach(toy(), "s2ft", targets=["up"], selection="weight-large")
    with pytest.raises(ValueError, match="batches= and loss= go together"):
        adapters.attach(toy(), "s2ft", targets=TARGETS, couple=COUPLE, batches=batches())
    with pytest.raises(ValueError, match="lora reads no data when attaching"):
        adapters.attach(toy(), "lora", targets=["up"], batches=batches(), loss=loss)
    with pytest.raises(ValueError, match="selection='weight' is not allowed"):
        adapters.attach(toy(), "s2ft", targets=TARGETS, couple=COUPLE, selection="weight")


def test_a_selected_adapter_saves_and_loads_onto_the_plain_model(tmp_path) -> None:
    model = toy()
    tuned = adapters.attach(model, "s2ft", targets=TARGETS, couple=COUPLE, ratio=RATIO,
                            selection="activation-small", batches=batches(), loss=loss)  # fmt: skip
    with torch.no_grad():
        for p in adapters.trainable_parameters(tuned):
            p.normal_()
    adapters.save_adapter(tuned, tmp_path / "a")
    loaded = adapters.load_adapter(toy(), tmp_path / "a")
    x = batches()[1][0]
    torch.testing.assert_close(loaded(x), tuned(x), rtol=0, atol=1e-13)
