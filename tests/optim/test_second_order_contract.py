"""MKOR, M-FAC and AdaHessian in the situations where torch.optim users meet them: split groups, frozen and
unfrozen layers, half precision, parameters that leave the graph."""

import copy
import gc

import torch
from torch import nn

from trainlab.optim import create

TEACHER = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
    return x, torch.tanh(x @ TEACHER)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        x, y = _batch(step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_mkor_weight_and_bias_in_separate_groups_step_as_one_group():
    one, two = _model(), _model()
    a = create("mkor", one.parameters(), lr=0.05, inv_freq=1)
    weights = [p for n, p in two.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in two.named_parameters() if n.endswith("bias")]
    b = create("mkor", [{"params": weights}, {"params": biases}], lr=0.05, inv_freq=1)
    _train(one, a, 5)
    _train(two, b, 5)
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters(), strict=True))
    # and a different weight decay on the biases is honoured, not refused
    three = _model()
    weights = [p for n, p in three.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in three.named_parameters() if n.endswith("bias")]
    c = create("mkor", [{"params": weights}, {"params": biases, "weight_decay": 0.0}], weight_decay=1e-2, lr=0.05)
    losses = _train(three, c, 5)
    assert losses[-1] < losses[0]
    assert [g["weight_decay"] for g in c.param_groups] == [1e-2, 0.0]


def test_mkor_with_a_frozen_bias_preconditions_the_weight():
    model = _model()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    optimizer = create("mkor", [p for p in model.parameters() if p.requires_grad], lr=0.05, inv_freq=1)
    losses = _train(model, optimizer, 20)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(model[0].bias, frozen)
    left = optimizer.state[model[0].weight]["precondition_mkor.left_inv"]
    assert left.shape == (5, 5) and not torch.equal(left, torch.eye(5))  # refreshed, bias column included


def test_mkor_takes_all_parameters_with_a_frozen_weight_as_torch_optim_does():
    # model.parameters() with a frozen layer: torch.optim skips it; MKOR registered a gradient hook on it and failed
    model = _model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    optimizer = create("mkor", model.parameters(), lr=0.05, inv_freq=1)
    losses = _train(model, optimizer, 20)
    assert losses[-1] < losses[0]
    assert torch.equal(model[0].weight, frozen) and model[0].weight not in optimizer.state


def test_mkor_preconditions_layers_added_with_add_param_group():
    model = _model()
    model[2].requires_grad_(False)
    optimizer = create("mkor", model[0].parameters(), lr=0.05, inv_freq=1)
    _train(model, optimizer, 2)
    model[2].requires_grad_(True)
    optimizer.add_param_group({"params": list(model[2].parameters())})
    _train(model, optimizer, 3, start=2)
    left = optimizer.state[model[2].weight]["precondition_mkor.left_inv"]
    assert left.shape == (9, 9) and not torch.equal(left, torch.eye(9))


def _mfac_loss(dtypes: list[torch.dtype], steps: int = 30) -> tuple[float, float]:
    model = _model()
    params = list(model.parameters())
    for p, dtype in zip(params, dtypes, strict=True):
        p.data = p.data.to(dtype)
    optimizer = create("mfac", params, ngrads=16, lr=5e-4)  # the default damp 1e-5
    x, y = _batch(0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        h = torch.tanh(x.to(params[0].dtype) @ params[0].T + params[1])
        out = h.to(params[2].dtype) @ params[2].T + params[3]
        loss = nn.functional.mse_loss(out.float(), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_mfac_trains_half_precision_and_mixed_groups_like_float32():
    # The Gram matrix of bfloat16 gradients summed in bfloat16 was not positive definite (Cholesky failed)
    # and the Woodbury correction lost the step; products are now summed in float32.
    start, reference = _mfac_loss([torch.float32] * 4)
    assert reference < 0.9 * start
    for dtypes in (
        [torch.bfloat16] * 4,
        [torch.float16] * 4,
        [torch.float64, torch.float32, torch.bfloat16, torch.float32],
    ):
        first, last = _mfac_loss(dtypes)
        assert last < 0.9 * first
        assert abs(last - reference) < 0.05 * reference, (dtypes, last, reference)  # measured: <= 2.1%


def test_adahessian_skips_a_parameter_that_leaves_the_graph_with_zeroed_grads():
    model = _model()
    unused = nn.Parameter(torch.ones(3))
    optimizer = create("adahessian", [*model.parameters(), unused], seed=0, lr=0.05)
    x, y = _batch(0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)  # leaves a zero gradient on `unused` after the first step
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    unused.grad = torch.zeros(3)
    losses = [optimizer.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0]
    assert torch.equal(unused, torch.ones(3)) and not optimizer.state[unused]


def test_mkor_removes_its_hooks_with_the_optimizer():
    model = _model()
    optimizer = create("mkor", model.parameters())
    copied = copy.deepcopy(optimizer)
    assert model[0].weight._post_accumulate_grad_hooks
    del optimizer, copied
    gc.collect()
    assert not model[0].weight._post_accumulate_grad_hooks
