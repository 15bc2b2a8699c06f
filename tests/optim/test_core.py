"""The optimizer shell with the `adamw` and `sgd` recipes: equal to torch.optim, and a good torch citizen."""

import io

import pytest
import torch
from torch import nn

from trainlab.optim import ChainOptimizer, chain, create, matrices_to, partition
from trainlab.optim.transforms import scale_by_adam, trace_momentum


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)


def _train(model, optimizer, steps, start=0, scheduler=None):
    for step in range(start, start + steps):
        x, y = _batch(step, next(model.parameters()).dtype)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _groups(model, wd_first, wd_second):
    first, second = model[0], model[2]
    return [
        {"params": list(first.parameters()), "weight_decay": wd_first},
        {"params": list(second.parameters()), "weight_decay": wd_second, "lr": 3e-3},
    ]


def _max_rel_err(a_model, b_model):
    pairs = zip(a_model.parameters(), b_model.parameters(), strict=True)
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)


def test_adamw_matches_torch_adamw_over_200_float64_steps():
    ours_model, ref_model = _model(), _model()
    ours = create("adamw", _groups(ours_model, 0.1, 0.0), lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    ref = torch.optim.AdamW(_groups(ref_model, 0.1, 0.0), lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    _train(ours_model, ours, 200)
    _train(ref_model, ref, 200)
    assert _max_rel_err(ours_model, ref_model) < 1e-6
    assert _max_rel_err(ours_model, _model()) > 1e-2  # it did move


@pytest.mark.parametrize(
    "hp",
    [
        {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
        {"momentum": 0.5, "dampening": 0.1, "weight_decay": 1e-3},
        {"momentum": 0.0, "weight_decay": 1e-2},
    ],
)
def test_sgd_matches_torch_sgd(hp):
    ours_model, ref_model = _model(), _model()
    ours = create("sgd", ours_model.parameters(), lr=0.05, **hp)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, **hp)
    _train(ours_model, ours, 100)
    _train(ref_model, ref, 100)
    assert _max_rel_err(ours_model, ref_model) < 1e-10


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_checkpoint_round_trip_continues_bitwise(name):
    model = _model(torch.float32)
    optimizer = create(name, model.parameters(), lr=1e-2)
    _train(model, optimizer, 10)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, 10, start=10)

    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    resumed = _model(torch.float32, seed=1)
    resumed.load_state_dict(payload["model"])
    resumed_opt = create(name, resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(payload["optimizer"])
    _train(resumed, resumed_opt, 10, start=10)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_the_step():
    ours_model, ref_model = _model(), _model()
    ours = create("adamw", ours_model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    _train(ours_model, ours, 30, scheduler=torch.optim.lr_scheduler.StepLR(ours, step_size=10, gamma=0.1))
    _train(ref_model, ref, 30, scheduler=torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.1))
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-5)  # three decays of 0.1
    assert _max_rel_err(ours_model, ref_model) < 1e-10
    # and the schedule mattered: a constant lr ends elsewhere
    const_model = _model()
    _train(const_model, create("adamw", const_model.parameters(), lr=1e-2), 30)
    assert _max_rel_err(ours_model, const_model) > 1e-3


def test_tensor_lr_equals_float_lr():
    a_model, b_model = _model(), _model()
    _train(a_model, create("adamw", a_model.parameters(), lr=torch.tensor(1e-2, dtype=torch.float64)), 20)
    _train(b_model, create("adamw", b_model.parameters(), lr=1e-2), 20)
    assert _max_rel_err(a_model, b_model) < 1e-12


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_bf16_parameters_step_downhill(name):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    optimizer = create(name, [p], lr=1e-2, weight_decay=0.0)
    before = p.detach().clone()
    p.grad = p.detach().clone()  # gradient of ½‖p‖²
    optimizer.step()
    assert p.dtype == torch.bfloat16
    assert (p.float().norm() < before.float().norm()).item()
    moved = (p - before).float()
    assert (moved * before.float() <= 0).all()  # every entry moved against its gradient (or stayed)


def test_parameters_without_grad_are_skipped():
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    optimizer = create("adamw", [used, unused], lr=0.1)
    used.grad = torch.ones(3)
    optimizer.step()
    assert not optimizer.state[unused]
    assert torch.equal(unused, torch.ones(3))  # not even weight decay touches it
    assert (used < 1).all()


def test_sparse_gradients_raise_a_clear_error():
    emb = nn.Embedding(10, 4, sparse=True)
    optimizer = create("adamw", emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_empty_parameter_list_raises():
    with pytest.raises(ValueError, match="empty"):
        create("adamw", [])


def test_unknown_keyword_is_named():
    with pytest.raises(ValueError, match="betaz"):
        create("adamw", _model().parameters(), betaz=(0.9, 0.99))
    with pytest.raises(ValueError, match="betaz"):
        ChainOptimizer(_model().parameters(), chain(scale_by_adam()), lr=1e-3, betaz=1)


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match="nope") as info:
        create("nope", _model().parameters())
    for name in ("adamw", "sgd", "lion"):
        assert name in str(info.value)


def test_partition_routes_by_ndim_and_name():
    model = _model()
    groups = partition(model.named_parameters(), matrices_to("mat", "vec", exclude=r"^2\."), {"vec": {"lr": 0.5}})
    by_chain = {g["chain"]: [name for name, _ in g["params"]] for g in groups}
    assert by_chain == {"mat": ["0.weight"], "vec": ["0.bias", "2.weight", "2.bias"]}
    assert next(g for g in groups if g["chain"] == "vec")["lr"] == 0.5
    # plain tensors carry no name, so only the dimensionality routes them
    plain = partition(model.parameters(), matrices_to("mat", "vec", exclude=r"^2\."))
    assert [len(g["params"]) for g in plain] == [2, 2]


def test_routed_chains_update_their_own_groups():
    model = _model()
    routed = partition(model.named_parameters(), matrices_to("mat", "vec"))
    groups = [{**g, "params": [p for _, p in g["params"]]} for g in routed]
    optimizer = ChainOptimizer(groups, {"mat": chain(scale_by_adam()), "vec": chain(trace_momentum())}, lr=1e-2)
    _train(model, optimizer, 3)
    assert set(optimizer.state[model[0].weight]) == {f"scale_by_adam.{k}" for k in ("step", "exp_avg", "exp_avg_sq")}
    assert set(optimizer.state[model[0].bias]) == {"trace_momentum.momentum_buffer", "trace_momentum.started"}


def test_step_hooks_fire():
    model = _model()
    optimizer = create("adamw", model.parameters())
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    _train(model, optimizer, 2)
    assert calls == ["pre", "post", "pre", "post"]


def test_grad_scaler_unscale_then_step():
    try:
        torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError) as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') is not supported here: {error}")
    ours_model, ref_model = _model(torch.float32), _model(torch.float32)
    ours = create("adamw", ours_model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for model, optimizer in ((ours_model, ours), (ref_model, ref)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(5):
            x, y = _batch(step, torch.float32)
            optimizer.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
    assert _max_rel_err(ours_model, ref_model) < 1e-5
    assert _max_rel_err(ours_model, _model(torch.float32)) > 1e-3


def test_load_state_dict_keeps_counters_on_cpu_in_float32_for_low_precision_params():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float16))
    opt = create("adamw", [w], lr=1e-3)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    opt.state[w]["scale_by_adam.step"].fill_(2049.0)  # not representable in float16
    saved = opt.state_dict()
    fresh = create("adamw", [w], lr=1e-3)
    fresh.load_state_dict(saved)
    step = fresh.state[w]["scale_by_adam.step"]
    assert step.dtype == torch.float32 and step.device.type == "cpu" and step.item() == 2049.0
    assert fresh.state[w]["scale_by_adam.exp_avg"].dtype == torch.float16
