"""Recipes declare their hyperparameters once (signature, defaults, ranges); every param group is held to them."""

import inspect
import pydoc

import pytest
import torch
from torch import nn

import trainlab.optim.recipes
from trainlab.optim import ChainOptimizer, create, get_spec, optimizer_names
from trainlab.optim.checks import Check
from trainlab.optim.optimizer import restored_state

CHAIN_RECIPES = [n for n in optimizer_names() if not n.startswith("torch-")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("name", optimizer_names())
def test_help_shows_every_hyperparameter_with_its_default_and_range(name):
    spec = get_spec(name)
    assert getattr(trainlab.optim.recipes, spec.factory.__name__) is spec.factory  # help(recipes.galore)
    text = pydoc.render_doc(spec.factory, renderer=pydoc.plaintext)
    signature = inspect.signature(spec.factory)
    assert spec.defaults == {k: p.default for k, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY}
    for key, default in spec.defaults.items():
        assert f"{key}: typing.Annotated[" in text
        assert f"{spec.ranges[key]!r}] = {default!r}" in text
        assert isinstance(spec.ranges[key], Check)
    assert spec.factory.__doc__ and "Args:" in spec.factory.__doc__


@pytest.mark.parametrize("name", CHAIN_RECIPES)
def test_every_declared_key_is_checked_in_every_param_group(name):
    model = _model()
    bad = object()  # outside every declared range
    for key in get_spec(name).defaults:
        with pytest.raises(ValueError, match=key):
            create(name, [{"params": list(model.parameters()), key: bad}])
        optimizer = create(name, [{"params": list(model[0].parameters())}])
        with pytest.raises(ValueError, match=key):  # groups added later too
            optimizer.add_param_group({"params": list(model[2].parameters()), key: bad})
        with pytest.raises(ValueError, match=key):  # and create's keywords
            create(name, model.parameters(), **{key: bad})


@pytest.mark.parametrize("name", CHAIN_RECIPES)
def test_unknown_group_keys_are_rejected_with_the_allowed_list(name):
    model = _model()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr_decay'\]; allowed: \[.*'lr'"):
        create(name, [{"params": list(model.parameters()), "lr_decay": 0.1}])
    optimizer = create(name, model[0].parameters())
    with pytest.raises(ValueError, match="lr_decay"):
        optimizer.add_param_group({"params": list(model[2].parameters()), "lr_decay": 0.1})


@pytest.mark.parametrize(
    ("name", "group", "word"),
    [
        ("galore", {"betas": (0.9, 1.5)}, r"betas\[1\]"),  # was unchecked per group
        ("cosmos", {"rank": 0}, "rank"),
        ("frugal", {"density": 1.5}, "density"),
        ("muon", {"adamw_betas": (0.9,)}, "adamw_betas"),
        ("muon", {"exclude": "head"}, "exclude"),  # a construction-time choice, not a group key
        ("spam", {"n_acc": 1}, "n_acc"),
        ("mfac", {"damp": 0.0}, "damp"),
        ("adamw", {"lr": torch.tensor([1e-3, 1e-3])}, "lr"),
    ],
)
def test_out_of_range_group_values_name_the_key(name, group, word):
    with pytest.raises(ValueError, match=word):
        create(name, [{"params": list(_model().parameters()), **group}])


@pytest.mark.parametrize("name", ["muon", "auon"])
def test_muon_group_lr_drives_matrices_and_adamw_keys_drive_the_rest(name):
    model = _model()
    default_adamw_lr = get_spec(name).defaults["adamw_lr"]
    optimizer = create(
        name,
        [
            {"params": list(model[0].parameters()), "lr": 0.05},
            {"params": list(model[2].parameters()), "lr": 0.07, "adamw_lr": 1e-2, "adamw_betas": (0.8, 0.9)},
        ],
        adamw_weight_decay=0.0,
    )
    lrs = {(g["chain"], tuple(p.shape)): (g["lr"], g.get("betas")) for g in optimizer.param_groups for p in g["params"]}
    assert lrs[(name, (6, 4))][0] == 0.05
    assert lrs[("adamw", (6,))][0] == default_adamw_lr  # not the group's lr 0.05
    assert lrs[(name, (3, 6))][0] == 0.07
    assert lrs[("adamw", (3,))] == (1e-2, (0.8, 0.9))  # the group's adamw_* keys, no longer ignored
    # The steps use them: a bias's AdamW step is at most its lr in size (plus rounding).
    bias = model[0].bias
    before = bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.allclose((before - bias).abs(), torch.full_like(bias, default_adamw_lr), rtol=1e-4)


def test_chain_optimizer_without_a_recipe_accepts_the_keys_its_chains_read():
    from trainlab.optim.transforms import scale_by_adam

    p = nn.Parameter(torch.zeros(3))
    optimizer = ChainOptimizer([p], scale_by_adam(), lr=1e-3)
    with pytest.raises(ValueError, match="betaz"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "betaz": (0.9, 0.9)})


def test_loaded_state_follows_one_rule():
    # Only step counters and 0-dim integer/bool flags stay on the host; all floating state (0-dim too, e.g.
    # Stable-SPAM's spike threshold) goes to the parameter's device and dtype. "meta" stands in for a GPU.
    param = torch.empty(3, device="meta", dtype=torch.bfloat16)
    counter = restored_state("scale_by_adam.step", torch.tensor(4.0), param)
    assert counter.device.type == "cpu" and counter.dtype == torch.float32
    assert restored_state("scale_by_adam.step", 4, param).item() == 4.0  # a plain number, as torch allows
    scalar = restored_state("clip_spikes_adaptive.max_abs_avg", torch.tensor(0.5, dtype=torch.float64), param)
    assert scalar.device.type == "meta" and scalar.dtype == torch.bfloat16
    moment = restored_state("scale_by_adam.exp_avg", torch.zeros(3), param)
    assert moment.device.type == "meta" and moment.dtype == torch.bfloat16
    wide = restored_state("scale_by_mfac.gram", torch.zeros(2, 2, dtype=torch.float64), param, wide=True)
    assert wide.dtype == torch.float32
    flag = restored_state("trace_momentum.started", torch.tensor(True), param)
    assert flag.device.type == "cpu" and flag.dtype == torch.bool
    seed = restored_state("project_subspace.seed", torch.tensor(2**62 - 1), param)
    assert seed.item() == 2**62 - 1 and seed.device.type == "cpu"  # a float cast would round it
    index = restored_state("project_subspace.index", torch.arange(3), param)
    assert index.device.type == "meta" and index.dtype == torch.int64
