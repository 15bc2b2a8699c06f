"""Masks: pruned weights stay exactly zero through training, optimizer steps (momentum, weight decay,
trainlab's own optimizers), deepcopy and state_dict round trips; no weight_orig/weight_mask clutter."""

import copy
import io

import pytest
import torch
from torch import nn

from trainlab.compress.masks import apply_mask, get_mask, masked_layers, masks_from_zeros, remove_mask, sparsity
from trainlab.compress.plan import Plan
from trainlab.optim import create


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _pruned_zero(model: nn.Module) -> bool:
    return all(bool((m.weight[~get_mask(m)] == 0).all()) for m in masked_layers(model).values())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
        lambda p: create("adamw", p, lr=1e-2),
    ],
    ids=["sgd-momentum-wd", "adamw", "adam-loop", "trainlab-adamw"],
)
def test_momentum_from_dense_training_cannot_revive_pruned_weights(make):
    model = _model()
    optimizer = make(model.parameters())
    _train(model, optimizer, 5)  # dense steps: momentum / Adam moments are non-zero everywhere
    Plan([(".*", "magnitude", 0.8)]).apply(model)
    kept = {n: get_mask(m).clone() for n, m in masked_layers(model).items()}
    _train(model, optimizer, 20, seed=1)
    assert _pruned_zero(model)
    assert {n: torch.equal(get_mask(m), kept[n]) for n, m in masked_layers(model).items()} == dict.fromkeys(kept, True)
    assert sparsity(model) == {"0": (512 - 102) / 512, "2": (128 - 26) / 128}  # exactly round(0.8 n) zeros
    assert not torch.equal(model[0].weight[get_mask(model[0])], torch.zeros(int(kept["0"].sum())))  # kept ones train


def test_gradients_of_pruned_entries_are_zeroed_before_the_step():
    model = _model()
    apply_mask(model[0], torch.rand(32, 16) > 0.5)
    seen = {}

    def record(optimizer, args, kwargs):
        seen["grad"] = model[0].weight.grad.clone()

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.register_step_post_hook(record)
    _train(model, optimizer, 1)
    assert bool((seen["grad"][~get_mask(model[0])] == 0).all())
    assert bool((optimizer.state[model[0].weight]["exp_avg"][~get_mask(model[0])] == 0).all())


def test_state_dict_has_plain_keys_only_and_reloading_dense_values_is_remasked():
    model = _model()
    Plan([(".*", "magnitude", 0.5)]).apply(model)
    state = model.state_dict()
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = _model()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    masks_from_zeros(fresh, ["0", "2"])
    assert all(
        torch.equal(get_mask(a), get_mask(b))
        for a, b in zip(masked_layers(model).values(), masked_layers(fresh).values(), strict=True)
    )
    model.load_state_dict(_model().state_dict())  # dense values loaded into a masked model
    assert _pruned_zero(model)
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        masks_from_zeros(fresh, ["nope"])


def test_deepcopy_carries_an_independent_mask():
    model = _model()
    Plan([("0", "magnitude", 0.5)]).apply(model)
    twin = copy.deepcopy(model)
    assert torch.equal(get_mask(twin[0]), get_mask(model[0]))
    assert get_mask(twin[0]) is not get_mask(model[0])
    _train(twin, torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9), 10)
    assert _pruned_zero(twin)
    assert not torch.equal(twin[0].weight, model[0].weight)  # the original did not move with the copy
    with torch.no_grad():
        twin[0].weight.fill_(1.0)  # a manual edit is re-masked at the next forward
    twin(torch.randn(2, 16))
    assert int((twin[0].weight != 0).sum()) == 256
    apply_mask(twin[0], torch.ones(32, 16, dtype=torch.bool))  # re-masking the copy leaves the original alone
    assert int(get_mask(model[0]).sum()) == 256


def test_remove_mask_allows_dense_training_again_and_bad_masks_are_errors():
    model = _model()
    mask = torch.rand(32, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    apply_mask(model[0], mask)
    remove_mask(model[0])
    assert get_mask(model[0]) is None and masked_layers(model) == {}
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    assert int((model[0].weight[~mask] != 0).sum()) > 100  # the pruned entries train again
    with pytest.raises(ValueError, match="does not match weight shape"):
        apply_mask(model[0], torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weight Parameter"):
        apply_mask(nn.ReLU(), torch.ones(1, dtype=torch.bool))


def test_two_forwards_before_one_backward_and_data_edits():
    model = _model()
    Plan([(".*", "magnitude", 0.5)]).apply(model)
    x = torch.randn(3, 16)
    (model(x).sum() + model(x).sum()).backward()  # the mask must not rewrite a weight autograd saved
    assert model[2].weight.grad is not None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].weight.data.fill_(2.0)  # .data bypasses the version counter: caught at the next step
    opt.step()
    assert _pruned_zero(model)


def test_a_masked_module_that_lost_its_weight_does_not_break_other_optimizers():
    stale = nn.Linear(4, 4)
    apply_mask(stale, torch.ones(4, 4, dtype=torch.bool))
    stale(torch.randn(1, 4))  # the hook is live
    del stale.weight  # e.g. the module was converted to another storage
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()  # the step hooks must skip the stale module
