"""AdaHessian, M-FAC and MKOR against float64 references written from their papers' equations."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trainlab.claims.curvature import direct_inverse_factors
from trainlab.curvature import rademacher_like
from trainlab.optim import create

torch.set_num_threads(1)
DTYPE = torch.float64


class ConvNet(nn.Module):
    """A conv kernel (spatial averaging), a linear layer and a bias: 2·1·3·3 + 2 + 3·8 + 3 = 47 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 1, 4, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (16,), generator=gen)


def closure_for(model: nn.Module, opt: torch.optim.Optimizer, step: int):
    x, y = batch(step)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# ---- AdaHessian ----


def adahessian_reference(model: nn.Module, steps: int, lr: float, wd: float, k: float, seed: int) -> list[torch.Tensor]:
    """Per-tensor float64 AdaHessian from the paper's equations, with an explicit Hessian for Hz."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-4
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        x, y = batch(t - 1)

        def loss_of(flat: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            chunks = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
            return F.cross_entropy(functional_call(model, dict(zip(names, chunks, strict=True)), (x,)), y)

        flat = torch.cat([p.reshape(-1) for p in params])
        grad = torch.autograd.functional.jacobian(loss_of, flat)
        hessian = torch.autograd.functional.hessian(loss_of, flat)
        z = rademacher_like(params, gen)
        hz = (hessian @ torch.cat([zi.reshape(-1) for zi in z])).split(sizes)
        for i, (g, h) in enumerate(zip(grad.split(sizes), hz, strict=True)):
            d = h.reshape(shapes[i]).abs()
            if d.ndim == 4:
                d = d.mean(dim=(2, 3), keepdim=True).expand_as(d)
            m[i] = beta1 * m[i] + (1 - beta1) * g.reshape(shapes[i])
            v[i] = beta2 * v[i] + (1 - beta2) * d * d
            denom = (v[i].sqrt() / (1 - beta2**t) ** 0.5) ** k + eps
            params[i] = params[i] - lr * (m[i] / (1 - beta1**t) / denom + wd * params[i])
    return params


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_adahessian_matches_float64_reference(power):
    torch.manual_seed(0)
    model = ConvNet().double()
    reference = adahessian_reference(model, steps=20, lr=0.05, wd=0.01, k=power, seed=7)
    opt = create("adahessian", model.parameters(), lr=0.05, weight_decay=0.01, hessian_power=power, seed=7)
    for t in range(20):
        opt.step(closure_for(model, opt, t))
    for p, r in zip(model.parameters(), reference, strict=True):
        assert torch.allclose(p.detach(), r, rtol=1e-10, atol=1e-12), (p - r).abs().max()


def test_adahessian_averages_conv_curvature_over_kernel_positions():
    torch.manual_seed(0)
    model = ConvNet().double()
    opt = create("adahessian", model.parameters(), seed=0)
    opt.step(closure_for(model, opt, 0))
    v = opt.state[model.conv.weight]["scale_by_adahessian.exp_hessian_diag_sq"]
    assert torch.allclose(v, v[:, :, :1, :1].expand_as(v))  # one value per (out, in) kernel
    assert v[:, :, 0, 0].unique().numel() == v[:, :, 0, 0].numel()  # but different across kernels
    fc = opt.state[model.fc.weight]["scale_by_adahessian.exp_hessian_diag_sq"]
    assert fc.unique().numel() > fc.numel() // 2  # linear weights keep their own entries


def test_adahessian_without_closure_says_to_pass_one():
    model = ConvNet().double()
    opt = create("adahessian", model.parameters())
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_adahessian_closure_must_call_backward():
    model = ConvNet().double()
    opt = create("adahessian", model.parameters())
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: F.cross_entropy(model(x), y))


def test_adahessian_step_leaves_plain_gradients():
    torch.manual_seed(0)
    model = ConvNet().double()
    opt = create("adahessian", model.parameters(), lr=0.0, weight_decay=0.0, seed=0)
    x, y = batch(0)
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    opt.step(closure_for(model, opt, 0))
    for p, g in zip(model.parameters(), expected, strict=True):
        assert p.grad.grad_fn is None and torch.allclose(p.grad, g)


# ---- M-FAC ----


def test_mfac_update_equals_explicit_inverse_fisher():
    gen = torch.Generator().manual_seed(0)
    params = [
        nn.Parameter(torch.randn(4, 5, generator=gen, dtype=DTYPE)),
        nn.Parameter(torch.randn(7, generator=gen, dtype=DTYPE)),
    ]
    m, damp, lr = 8, 1e-2, 0.1
    opt = create("mfac", params, ngrads=m, damp=damp, lr=lr)
    window = torch.zeros(m, 27, dtype=DTYPE)
    for t in range(20):  # wraps the window twice
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=DTYPE)
        g = torch.cat([p.grad.reshape(-1) for p in params])
        window[t % m] = g
        expected = torch.linalg.solve(damp * torch.eye(27, dtype=DTYPE) + window.T @ window / m, g)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in params])
        direction = (before - after) / lr
        assert ((direction - expected).norm() / expected.norm()).item() < 1e-10, t


def test_mfac_momentum_starts_at_zero_as_in_the_official_code():
    """optim.py: v = μv + (1−μ)u with v = 0 at first, so with μ = 0.9 the first step is 0.1·u (not u)."""
    gen = torch.Generator().manual_seed(1)
    params = [
        nn.Parameter(torch.randn(3, 4, generator=gen, dtype=DTYPE)),
        nn.Parameter(torch.randn(5, generator=gen, dtype=DTYPE)),
    ]
    m, damp, lr, mu = 4, 1e-1, 0.1, 0.9
    opt = create("mfac", params, ngrads=m, damp=damp, lr=lr, momentum=mu)
    window, v = torch.zeros(m, 17, dtype=DTYPE), torch.zeros(17, dtype=DTYPE)
    for t in range(7):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=DTYPE)
        g = torch.cat([p.grad.reshape(-1) for p in params])
        window[t % m] = g
        v = mu * v + (1 - mu) * torch.linalg.solve(damp * torch.eye(17, dtype=DTYPE) + window.T @ window / m, g)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in params])
        assert (((before - after) / lr - v).norm() / v.norm()).item() < 1e-10, t


def test_mfac_state_is_the_window_and_gram_shares():
    params = [nn.Parameter(torch.zeros(10, 3)), nn.Parameter(torch.zeros(5))]
    opt = create("mfac", params, ngrads=16)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    st = opt.state[params[0]]
    assert st["scale_by_mfac.grad_window"].shape == (16, 30)
    assert st["scale_by_mfac.gram"].shape == (16, 16)


# ---- MKOR ----


def test_mkor_sherman_morrison_inverses_equal_direct_inverses_over_50_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = create("mkor", model.parameters(), lr=0.05, momentum=0.0, inv_freq=1)
    layer = model[0]
    inputs, grads = [], []
    for t in range(51):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(32, 6, generator=gen, dtype=DTYPE), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        stats = opt.chains["default"].transforms[0].observer.layers[id(layer.weight)]
        inputs.append(stats.inputs.clone())
        grads.append(stats.output_grads.clone())
        w_grad, b_grad = layer.weight.grad.clone(), layer.bias.grad.clone()
        before = (layer.weight.detach().clone(), layer.bias.detach().clone())
        opt.step()
    left_ref, right_ref = direct_inverse_factors(inputs, grads, 0.95, 0.1)
    state = opt.state[layer.weight]
    left, right = state["precondition_mkor.left_inv"], state["precondition_mkor.right_inv"]
    assert left.shape == (7, 7) and right.shape == (5, 5)  # bias column folded into the input factor
    assert ((left - left_ref).norm() / left_ref.norm()).item() < 1e-10
    assert ((right - right_ref).norm() / right_ref.norm()).item() < 1e-10
    # The last step: U = R⁻¹[∇W | ∇b]L⁻¹ rescaled to the gradient's norm; SGD without momentum.
    u = right_ref @ torch.cat([w_grad, b_grad[:, None]], 1) @ left_ref
    u = u * (w_grad.norm() + b_grad.norm()) / (u[:, :6].norm() + u[:, 6].norm())
    assert torch.allclose((before[0] - layer.weight.detach()) / 0.05, u[:, :6], rtol=1e-9, atol=1e-12)
    assert torch.allclose((before[1] - layer.bias.detach()) / 0.05, u[:, 6], rtol=1e-9, atol=1e-12)


class ScaledConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.scale = nn.Parameter(torch.ones(()))
        self.fc = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.scale * torch.tanh(self.conv(x)).flatten(1))


def test_mkor_preconditions_conv_and_falls_back_to_sgd_elsewhere():
    torch.manual_seed(0)
    model = ScaledConv().double()
    opt = create("mkor", model.parameters(), lr=0.1, momentum=0.0)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    scale_before, scale_grad = model.scale.detach().clone(), model.scale.grad.clone()
    opt.step()
    conv = opt.state[model.conv.weight]
    assert conv["precondition_mkor.left_inv"].shape == (10, 10)  # 1·3·3 inputs + bias
    assert conv["precondition_mkor.right_inv"].shape == (2, 2)
    assert opt.state[model.fc.weight]["precondition_mkor.left_inv"].shape == (8, 8)  # no bias
    assert opt.state[model.scale]["precondition_mkor.left_inv"].numel() == 0
    assert torch.allclose(model.scale.detach(), scale_before - 0.1 * scale_grad)  # plain SGD


def test_mkor_needs_a_forward_after_creation():
    model = nn.Linear(3, 2)
    F.mse_loss(model(torch.randn(4, 3)), torch.zeros(4, 2)).backward()
    opt = create("mkor", model.parameters())
    with pytest.raises(RuntimeError, match="forward pass"):
        opt.step()


# ---- checkpoints and arguments ----


@pytest.mark.parametrize(
    "name,hp",
    [("adahessian", {"seed": 3}), ("mfac", {"ngrads": 4, "damp": 1e-2, "lr": 1e-2}), ("mkor", {"inv_freq": 2})],
)
def test_state_dict_round_trip_with_weights_only(name, hp):
    torch.manual_seed(0)
    model = ConvNet().double()
    twin = ConvNet().double()
    twin.load_state_dict(model.state_dict())
    opt = create(name, model.parameters(), **hp)
    for t in range(3):
        opt.step(closure_for(model, opt, t))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin.load_state_dict(model.state_dict())
    twin_opt = create(name, twin.parameters(), **hp)
    if name == "mkor":  # the observer learns the layers from a forward pass
        twin(batch(0)[0])
    twin_opt.load_state_dict(torch.load(buffer, weights_only=True))
    for t in range(3, 6):
        opt.step(closure_for(model, opt, t))
        twin_opt.step(closure_for(twin, twin_opt, t))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("adahessian", {"hessian_power": 2.0}, "hessian_power"),
        ("adahessian", {"betas": (0.9,)}, "betas"),
        ("adahessian", {"seed": "x"}, "seed"),
        ("mfac", {"ngrads": 0}, "ngrads"),
        ("mfac", {"damp": 0.0}, "damp"),
        ("mkor", {"inv_freq": 0}, "inv_freq"),
        ("mkor", {"stabilization_factor": 1.5}, "stabilization_factor"),
        ("mkor", {"rank": 1}, "unknown"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, bad, match):
    with pytest.raises(ValueError, match=match):
        create(name, ConvNet().parameters(), **bad)


def test_adahessian_steps_through_fused_attention():
    torch.manual_seed(0)
    proj = nn.Linear(4, 4)
    x = torch.randn(2, 2, 8, 4)
    opt = create("adahessian", proj.parameters(), seed=0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        q = proj(x)
        loss = F.scaled_dot_product_attention(q, q, q, is_causal=True).square().mean()
        loss.backward()
        return loss

    before = proj.weight.detach().clone()
    opt.step(closure)
    assert not torch.equal(before, proj.weight)
