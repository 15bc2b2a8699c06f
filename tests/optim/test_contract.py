"""The behavioural contract of a `torch.optim.Optimizer`, checked on every registered recipe.

Modelled on PyTorch's own optimizer suite (``TestOptimRenewed`` in test/test_optim.py over the
``OptimizerInfo`` matrix of torch/testing/_internal/common_optimizers.py): each check is parametrized over
`optimizer_names()`, so a new recipe joins automatically. What differs per recipe is declared once, in
`RECIPES` (small settings so a step is cheap, and what a recipe needs: a closure, modules) and in
`COMPLEX_REFUSED` (recipes that refuse complex parameters, a tested refusal). The torch-* baselines run
the same checks, which keeps the checks honest: torch.optim passes them.
"""

import copy
import io
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from trainlab.optim import create, get_spec, optimizer_names
from trainlab.optim.transform import is_step_counter


@dataclass(frozen=True)
class Recipe:
    settings: dict[str, Any] = field(default_factory=dict)  # small windows/ranks, a converging lr
    needs_closure: bool = False  # step(closure) is the only way to step (a Hessian-vector product)
    tensor_lr: bool = True  # torch.optim.AdamW(foreach=True) refuses a tensor lr at construction


RECIPES = {
    "mfac": Recipe({"ngrads": 4, "damp": 0.1, "lr": 1e-2}),
    "adahessian": Recipe({"seed": 0, "lr": 0.05}, needs_closure=True),
    "auon": Recipe({"lr": 0.05}),
    "galore": Recipe({"rank": 2, "update_proj_gap": 2}),
    "gradnorm-lorp": Recipe({"rank": 2, "update_proj_gap": 2}),
    "frugal": Recipe({"update_gap": 2}),
    "cosmos": Recipe({"rank": 2}),
    "spam": Recipe({"warmup_steps": 0}),
    "stable-spam": Recipe({"lr": 1e-2}),
    "lion": Recipe({"lr": 1e-2}),
    "lion-k": Recipe({"lr": 1e-2}),
    "sgd": Recipe({"lr": 0.05}),
    "torch-sgd": Recipe({"lr": 0.05}),
    "torch-adamw": Recipe(tensor_lr=False),
    "mkor": Recipe({"lr": 0.05, "inv_freq": 1}),  # refresh the factors at every step
}
# Complex parameters stepped as their real views (torch's rule) by every recipe but these, which refuse them
# at construction: orthogonalized and low-rank matrix updates and curvature probes are defined for real weights.
COMPLEX_REFUSED = {"muon", "auon", "galore", "frugal", "cosmos", "gradnorm-lorp", "adahessian", "mkor"}
NAMES = optimizer_names()


def _recipe(name: str) -> Recipe:
    return RECIPES.get(name, Recipe())


def _make(name: str, params: Any, **overrides: Any) -> torch.optim.Optimizer:
    return create(name, params, **{**_recipe(name).settings, **overrides})


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


TEACHER = torch.randn(4, 3, generator=torch.Generator().manual_seed(123))


def _closure(model: nn.Module, optimizer: torch.optim.Optimizer, step: int):
    """The closure of step ``step``: a fresh batch of a learnable task (a fixed teacher)."""
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
    x, y = x.to(dtype), torch.tanh(x @ TEACHER).to(dtype)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    return [optimizer.step(_closure(model, optimizer, s)).item() for s in range(start, start + steps)]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure_returns_the_loss_and_descends(name):
    model = _model()
    optimizer = _make(name, model.named_parameters())
    losses = [optimizer.step(_closure(model, optimizer, 0)).item() for _ in range(15)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bitwise(name):
    model = _model()
    optimizer = _make(name, model.named_parameters())
    _train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = _make(name, resumed.named_parameters())
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _train(model, optimizer, 3, start=3)
    _train(resumed, resumed_optimizer, 3, start=3)
    assert _same(_params(model), _params(resumed))


@pytest.mark.parametrize(
    ("saved_dtype", "loaded_dtype"),
    [(torch.float32, torch.float64), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_casts_state_to_the_parameters_dtype(name, saved_dtype, loaded_dtype):
    model = _model(saved_dtype)
    optimizer = _make(name, model.named_parameters())
    _train(model, optimizer, 2)
    target = _model(loaded_dtype)
    target_optimizer = _make(name, target.named_parameters())
    target_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for p in target.parameters():
        for key, value in target_optimizer.state[p].items():
            if not torch.is_tensor(value):
                continue
            if is_step_counter(key):  # as torch.optim keeps them: on the host, as saved
                assert value.device.type == "cpu"
            elif value.is_floating_point():  # the parameter's dtype, or float32 for declared wide state
                assert value.dtype in (loaded_dtype, torch.promote_types(loaded_dtype, torch.float32)), key
    before = _params(target)
    _train(target, target_optimizer, 1, start=2)
    after = _params(target)
    assert all(a.dtype == loaded_dtype and torch.isfinite(a).all() for a in after)
    assert not _same(before, after)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_copies_state_that_is_not_a_parameters(name):
    model = _model()
    optimizer = _make(name, model.named_parameters())
    _train(model, optimizer, 1)
    state_dict = optimizer.state_dict()
    state_dict["state"]["extra"] = {"note": torch.ones(2)}
    optimizer.load_state_dict(state_dict)
    assert torch.equal(optimizer.state["extra"]["note"], torch.ones(2))
    _train(model, optimizer, 1, start=1)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copies_keep_stepping_like_the_original(name, how):
    model = _model()
    optimizer = _make(name, model.named_parameters())
    _train(model, optimizer, 2)
    pair = (model, optimizer)
    copied_model, copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert {k for k in vars(copied) if not k.startswith("_")} == {k for k in vars(optimizer) if not k.startswith("_")}
    _train(model, optimizer, 2, start=2)
    _train(copied_model, copied, 2, start=2)
    assert _same(_params(model), _params(copied_model))


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr(name):
    model, twin = _model(), _model()
    lr = _recipe(name).settings.get("lr", get_spec(name).defaults["lr"])
    if not _recipe(name).tensor_lr:
        with pytest.raises(ValueError, match="lr"):
            _make(name, model.named_parameters(), lr=torch.tensor(lr))
        return
    optimizer = _make(name, model.named_parameters(), lr=torch.tensor(lr))
    reference = _make(name, twin.named_parameters(), lr=lr)
    _train(model, optimizer, 2)
    _train(twin, reference, 2)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(_params(model), _params(twin), strict=True))
    with pytest.raises(ValueError, match="lr"):
        _make(name, model.named_parameters(), lr=torch.tensor([lr, lr]))


@pytest.mark.parametrize("name", NAMES)
def test_single_tensor_groups_and_bare_tensors(name):
    model = _model()
    weight, bias = model[0].weight, model[0].bias
    optimizer = _make(name, [{"params": weight}, {"params": bias}])
    assert sorted(len(g["params"]) for g in optimizer.param_groups) == [1, 1]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(weight), id(bias)}
    with pytest.raises(TypeError):
        _make(name, weight)


@pytest.mark.parametrize("name", NAMES)
def test_unfreezing_layers_with_add_param_group(name):
    # The classic fine-tuning move: train the first layer, then add the second (a matrix and a bias).
    model = _model()
    first = list(model[0].named_parameters(prefix="0"))
    second = list(model[2].named_parameters(prefix="2"))
    optimizer = _make(name, first)
    _train(model, optimizer, 2)
    optimizer.add_param_group({"params": second, "lr": 0.01})
    # The same groups as a constructor given both from the start.
    reference = _make(name, [{"params": first}, {"params": second, "lr": 0.01}])

    def groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in opt.param_groups]

    assert groups(optimizer) == groups(reference)
    before = [p.detach().clone() for _, p in second]
    _train(model, optimizer, 1, start=2)
    assert all(not torch.equal(b, p) for b, (_, p) in zip(before, second, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire_once_per_step(name):
    create("adamw", [nn.Parameter(torch.zeros(2))])  # another trainlab optimizer in the process
    model = _model()
    optimizer = _make(name, model.named_parameters())
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    _train(model, optimizer, 2)
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_changes_nothing(name):
    model = _model()
    optimizer = _make(name, model.named_parameters())
    before = _params(model)
    if _recipe(name).needs_closure:
        with pytest.raises(RuntimeError, match="loss.backward"):
            optimizer.step(lambda: torch.tensor(1.0))
    else:
        optimizer.step()
    assert _same(before, _params(model))


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_every_group(name):
    model = _model()
    optimizer = _make(name, model.named_parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    start = [g["lr"] for g in optimizer.param_groups]
    _train(model, optimizer, 1)
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [lr / 2 for lr in start]


@pytest.mark.parametrize("name", [n for n in NAMES if not _recipe(n).needs_closure])
def test_grad_scaler_steps_equal_the_unscaled_run(name):
    # GradScaler.step does not take a closure; recipes that need one (adahessian) cannot use it.
    model, twin = _model(), _model()
    optimizer = _make(name, model.named_parameters())
    reference = _make(name, twin.named_parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for step in range(3):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        y = torch.tanh(x @ TEACHER)
        optimizer.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        reference.zero_grad()
        nn.functional.mse_loss(twin(x), y).backward()
        reference.step()
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(_params(model), _params(twin), strict=True))


def _complex_params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 3, dtype=torch.complex64, generator=g).requires_grad_(),
        torch.randn(4, dtype=torch.complex64, generator=g).requires_grad_(),
        torch.randn(4, 3, generator=g).requires_grad_(),  # real and complex in one group
    ]


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_step_as_their_real_views_or_are_refused(name):
    complex_params = _complex_params(0)
    if name in COMPLEX_REFUSED:
        with pytest.raises(ValueError, match="complex parameters are not supported"):
            _make(name, complex_params)
        return
    real_params = [
        (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in complex_params
    ]
    ours, reference = _make(name, complex_params), _make(name, real_params)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for c, r in zip(complex_params, real_params, strict=True):
            r.grad = torch.randn(r.shape, generator=g)
            c.grad = torch.view_as_complex(r.grad) if c.is_complex() else r.grad.clone()
        ours.step()
        reference.step()
    for c, r in zip(complex_params, real_params, strict=True):
        torch.testing.assert_close(torch.view_as_real(c) if c.is_complex() else c, r)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_group(name):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 3).to(dtype) for dtype in (torch.float64, torch.float32, torch.bfloat16)]
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = _make(name, params)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum((layer(x.to(layer.weight.dtype)).float() - 1).pow(2).mean() for layer in layers)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    optimizer.step(closure)
    assert all(p.dtype == b.dtype and not torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_every_recipe_is_checked():
    # A recipe whose settings key is misspelled would silently get the defaults.
    assert set(RECIPES) <= set(NAMES)
    assert COMPLEX_REFUSED <= set(NAMES)
