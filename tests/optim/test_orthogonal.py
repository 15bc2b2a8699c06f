"""Muon, AuON and ⊥Grad against float64 references written from their equations."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from trainlab.optim import ChainOptimizer, chain, create
from trainlab.optim.recipes.orthogonal import orthogonalized, orthograd
from trainlab.optim.transforms import newton_schulz, orthogonalize_gradient, scale_by_auon, scale_by_muon

torch.set_num_threads(1)


# ---- references (plain per-tensor float64, straight from the equations) ----


def ref_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def ref_direction(kind: str, g: torch.Tensor, buf: torch.Tensor, beta: float, gamma: float, nesterov: bool = True):
    """Returns (direction, new buffer) for one tensor."""
    buf = beta * buf + (1 - beta) * g
    u = (1 - beta) * g + beta * buf if nesterov else buf
    m = u.reshape(u.shape[0], -1)
    scale = max(1.0, m.shape[0] / m.shape[1]) ** 0.5
    if kind == "muon":
        x = ref_newton_schulz(m)
    else:
        x = m / (torch.linalg.norm(m) + 1e-7)
        x = x / torch.sqrt(torch.mean(torch.cosh(gamma * x) ** 2))
    return (scale * x).reshape(g.shape), buf


def fake_grad(p: torch.Tensor, target: torch.Tensor, step: int, i: int) -> torch.Tensor:
    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i), dtype=torch.float64)
    return (p - target) + 0.3 * noise.to(p.dtype)


SHAPES = [(24, 16), (24, 16), (40, 10), (6, 3, 3, 3)]  # two of one shape (batched NS), a tall one, a conv


def run_against_reference(kind: str, dtype: torch.dtype, steps: int, **hp) -> float:
    """Max |param − reference param| after ``steps`` steps of create(kind) on plain tensors (all to ``kind``)."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params = [nn.Parameter(w.to(dtype)) for w in init]
    opt = create(kind, params, **hp)
    lr, wd, beta = opt.param_groups[0]["lr"], hp.get("weight_decay", 0.0), hp.get("momentum", 0.95)
    gamma, nesterov = hp.get("gamma", 1.5), hp.get("nesterov", True)
    ref = [w.clone() for w in init]
    bufs = [torch.zeros_like(w) for w in init]
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = fake_grad(p.detach(), targets[i].to(dtype), t, i)
        opt.step()
        for i in range(len(ref)):
            d, bufs[i] = ref_direction(kind, fake_grad(ref[i], targets[i], t, i), bufs[i], beta, gamma, nesterov)
            ref[i] = ref[i] * (1 - lr * wd) - lr * d
    return max((p.detach().double() - r).abs().max().item() for p, r in zip(params, ref, strict=True))


# ---- Newton–Schulz ----


@pytest.mark.parametrize("shape", [(256, 128), (128, 256)])
def test_newton_schulz_singular_values_in_spec_band(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g)
    assert x.dtype == torch.float32 and x.shape == g.shape
    s = torch.linalg.svdvals(x.double())
    assert 0.68 <= s.min().item() and s.max().item() <= 1.14
    # an odd matrix polynomial keeps g's singular vectors: Uᵀ X V is diagonal
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    core = u.T @ x.double() @ vh.T
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-4


def test_newton_schulz_matches_reference_and_batches():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(3, 30, 20, generator=gen, dtype=torch.float64)
    batched = newton_schulz(g)
    for i in range(3):
        assert torch.allclose(batched[i], ref_newton_schulz(g[i]), atol=1e-12)
    g32 = g.float()
    assert (newton_schulz(g32).double() - batched).abs().max() < 1e-5


def test_newton_schulz_rejects_vectors_and_bad_steps():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.ones(3))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(torch.ones(3, 3), steps=0)


# ---- Muon and AuON vs references ----


@pytest.mark.parametrize("kind", ["muon", "auon"])
def test_matches_float64_reference_over_60_steps(kind):
    assert run_against_reference(kind, torch.float64, 60, weight_decay=0.05) < 1e-10


@pytest.mark.parametrize("kind", ["muon", "auon"])
def test_float32_tracks_float64_reference(kind):
    assert run_against_reference(kind, torch.float32, 60) < 2e-4


def test_muon_without_nesterov_matches_reference():
    assert run_against_reference("muon", torch.float64, 20, nesterov=False, momentum=0.9, lr=0.05) < 1e-10


def test_auon_gamma_one_matches_reference():
    assert run_against_reference("auon", torch.float64, 20, gamma=1.0) < 1e-10


def test_auon_update_frobenius_norm_is_lr_times_scale():
    for shape, scale in [((64, 64), 1.0), ((128, 32), 2.0), ((32, 128), 1.0)]:
        p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        opt = ChainOptimizer([p], chain(scale_by_auon()), lr=0.24)
        p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        opt.step()
        n = shape[0] * shape[1]
        ratio = p.detach().norm().item() / (0.24 * scale)
        assert abs(ratio - 1) < 1e-3  # the spec's ±0.1%
        # r = sqrt(mean(cosh(γx)²)) ≈ sqrt(1 + γ²/n) for unit-Frobenius x: the brake is a tiny correction
        assert math.isclose(1 / ratio, math.sqrt(1 + 1.5**2 / n), rel_tol=1e-5)
    # n = 4096 (64x64): r − 1 = 2.7e-4 (spec, verified)
    assert math.isclose(math.sqrt(1 + 1.5**2 / 4096) - 1, 2.7e-4, rel_tol=0.02)


def test_transforms_do_not_write_into_gradients():
    for transform in (scale_by_muon(), scale_by_auon(), orthogonalize_gradient()):
        p = nn.Parameter(torch.randn(8, 5))
        opt = ChainOptimizer([p], chain(transform), lr=0.1)
        for _ in range(3):
            p.grad = torch.randn(8, 5)
            before = p.grad.clone()
            opt.step()
            assert torch.equal(p.grad, before)


def test_matrix_transforms_reject_vectors():
    p = nn.Parameter(torch.randn(5))
    p.grad = torch.ones(5)
    for transform in (scale_by_muon(), scale_by_auon()):
        with pytest.raises(ValueError, match="2\\+ dimensions"):
            ChainOptimizer([p], chain(transform), lr=0.1).step()


@pytest.mark.parametrize("kind,lr", [("muon", 0.3), ("auon", 1.0)])
def test_converges_on_matrix_least_squares(kind, lr):
    """min ½‖AW − B‖²: with a linearly decaying lr the normalized steps settle on the optimum."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    w_star = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    b = a @ w_star
    w = nn.Parameter(torch.zeros(16, 8, dtype=torch.float64))
    opt = create(kind, [w], lr=lr, momentum=0.9)
    steps = 300
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=steps)
    start = (w_star.norm()).item()
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (a @ w - b).pow(2).sum()).backward()
        opt.step()
        sched.step()
    assert (w.detach() - w_star).norm().item() < 0.02 * start


def test_state_dict_round_trip_continues_identically():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def step(model, opt):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for kind in ("muon", "auon", "orthograd"):
        m1 = make()
        o1 = create(kind, m1.named_parameters())
        for _ in range(3):
            step(m1, o1)
        m2 = make()
        m2.load_state_dict(m1.state_dict())
        o2 = create(kind, m2.named_parameters())
        buffer = io.BytesIO()
        torch.save(o1.state_dict(), buffer)
        buffer.seek(0)
        o2.load_state_dict(torch.load(buffer, weights_only=True))
        for _ in range(3):
            step(m1, o1)
            step(m2, o2)
        for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
            assert torch.equal(p1, p2)


# ---- routing ----


class TinyLM(nn.Module):
    """pylm-like: token embedding, LayerNorm, hidden Linear layers, output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.lm_head = nn.Linear(16, 50, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.fc2(torch.relu(self.fc1(self.ln(self.embed(idx))))))


@pytest.mark.parametrize("kind", ["muon", "auon"])
def test_routing_sends_exactly_hidden_matrices_to_the_matrix_chain(kind):
    model = TinyLM()
    opt = create(kind, model.named_parameters(), adamw_lr=1e-3, adamw_betas=(0.8, 0.9), adamw_weight_decay=0.2)
    by_chain = {g["chain"]: g for g in opt.param_groups}
    assert set(by_chain) == {kind, "adamw"}
    assert by_chain[kind]["param_names"] == ["fc1.weight", "fc2.weight"]
    assert sorted(by_chain["adamw"]["param_names"]) == sorted(
        ["embed.weight", "ln.weight", "ln.bias", "fc1.bias", "lm_head.weight"]
    )
    adamw = by_chain["adamw"]
    assert (adamw["lr"], adamw["betas"], adamw["weight_decay"]) == (1e-3, (0.8, 0.9), 0.2)
    spec_lr = {"muon": 0.02, "auon": 0.24}[kind]
    assert (by_chain[kind]["lr"], by_chain[kind]["weight_decay"]) == (spec_lr, 0.0)
    # one step updates everything; the AdamW group follows torch.optim.AdamW exactly
    reference = TinyLM()
    reference.load_state_dict(model.state_dict())
    ref_params = [p for n, p in reference.named_parameters() if n not in ("fc1.weight", "fc2.weight")]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-3, betas=(0.8, 0.9), weight_decay=0.2, eps=adamw["eps"])
    idx = torch.randint(0, 50, (4, 7))
    for m, o in ((model, opt), (reference, ref_opt)):
        m(idx).logsumexp(-1).mean().backward()
        o.step()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if n in ("fc1.weight", "fc2.weight"):
            assert not torch.equal(p, q)
        else:
            assert torch.allclose(p, q, atol=1e-7), n


def test_routing_exclude_is_configurable_and_plain_tensors_route_by_dimension():
    model = TinyLM()
    opt = create("muon", model.named_parameters(), exclude=None)
    muon_names = next(g["param_names"] for g in opt.param_groups if g["chain"] == "muon")
    assert sorted(muon_names) == ["embed.weight", "fc1.weight", "fc2.weight", "lm_head.weight"]
    opt = create("muon", model.named_parameters(), exclude=r"^fc2\.")
    muon_names = next(g["param_names"] for g in opt.param_groups if g["chain"] == "muon")
    assert sorted(muon_names) == ["embed.weight", "fc1.weight", "lm_head.weight"]
    opt = create("muon", model.parameters())  # no names: only the dimensionality rule applies
    muon_group = next(g for g in opt.param_groups if g["chain"] == "muon")
    assert len(muon_group["params"]) == 4


@pytest.mark.parametrize(
    "kind,kwargs,match",
    [
        ("muon", {"momentum": 1.0}, "momentum"),
        ("muon", {"ns_steps": 0}, "ns_steps"),
        ("muon", {"exclude": "("}, "exclude"),
        ("muon", {"adamw_betas": (0.9,)}, "adamw_betas"),
        ("muon", {"adamw_lr": -1.0}, "adamw_lr"),
        ("auon", {"gamma": 0.0}, "gamma"),
        ("auon", {"weight_decay": -0.1}, "weight_decay"),
        ("muon", {"betas": (0.9, 0.9)}, "unknown hyperparameter"),
    ],
)
def test_bad_hyperparameters_raise(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create(kind, TinyLM().named_parameters(), **kwargs)


# ---- ⊥Grad ----


def test_orthogonalize_gradient_removes_the_weight_component_and_keeps_the_norm():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(30, 20), (7,), (4, 3, 2)]]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) + 3 * p for p in params]
    out, _ = orthogonalize_gradient().update(grads, {}, params, {})
    for w, g, o in zip(params, grads, out, strict=True):
        cos = torch.dot(w.flatten(), o.flatten()) / (w.norm() * o.norm())
        assert abs(cos.item()) < 1e-10
        assert math.isclose(o.norm().item(), g.norm().item(), rel_tol=1e-12)
        g_perp = g - torch.dot(w.flatten(), g.flatten()) / torch.dot(w.flatten(), w.flatten()) * w
        assert torch.allclose(o, g_perp * g.norm() / g_perp.norm(), atol=1e-12)
    zero = torch.zeros(5, dtype=torch.float64)
    out, _ = orthogonalize_gradient().update([torch.ones(5, dtype=torch.float64)], {}, [zero], {})
    assert torch.equal(out[0], torch.ones(5, dtype=torch.float64))  # zero weight: nothing to remove


def test_orthograd_sgd_matches_hand_reference():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(32, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=gen)
    w = nn.Parameter(w0.clone())
    opt = orthogonalized("sgd", [w], lr=0.5, momentum=0.0)
    ref = w0.clone()
    for _ in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(x @ w, y).backward()
        opt.step()
        r = ref.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(x @ r, y), r)
        g_perp = g - (ref * g).sum() / (ref * ref).sum() * ref
        ref = ref - 0.5 * g_perp * g.norm() / g_perp.norm()
    assert torch.allclose(w.detach(), ref, atol=1e-12)
    # ⊥SGD cannot grow the weights to first order: ‖w‖ only changes at second order
    assert abs(w.detach().norm() - w0.norm()) < 0.1 * w0.norm()


def test_orthograd_adamw_defaults_and_torch_adamw_on_projected_gradients():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (40,), generator=gen)
    w = nn.Parameter(w0.clone())
    opt = create("orthograd", [w])
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-2, (0.9, 0.99), 1e-25, 0.0)
    v = nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([v], lr=1e-2, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
    for _ in range(20):
        for p, o in ((w, opt), (v, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(x @ p, y).backward()
        with torch.no_grad():
            (g_perp,), _ = orthogonalize_gradient().update([v.grad], {}, [v], {})
            v.grad.copy_(g_perp)
        opt.step()
        ref.step()
    assert torch.allclose(w.detach(), v.detach(), atol=1e-12)


def test_orthograd_wraps_any_chain_recipe_and_rejects_others():
    model = TinyLM()
    opt = create("orthograd", model.named_parameters(), base="muon", lr=0.02)
    assert {g["chain"] for g in opt.param_groups} == {"muon", "adamw"}
    assert all(t.transforms[0].name == "orthogonalize_gradient" for t in opt.chains.values())
    wrapped = orthograd(scale_by_muon())
    assert [t.name for t in wrapped.transforms] == ["orthogonalize_gradient", "scale_by_muon"]
    with pytest.raises(ValueError, match="not a transform-chain recipe"):
        create("orthograd", model.parameters(), base="torch-adamw")
    with pytest.raises(ValueError, match="does not accept"):
        create("orthograd", model.parameters(), base="sgd", betas=(0.5, 0.5))
    with pytest.raises(ValueError, match="unknown optimizer"):
        create("orthograd", model.parameters(), base="nope")


# ---- the shared chain steps and ns_dtype ----


def test_muon_and_auon_are_chains_of_shared_steps():
    from trainlab.optim.transforms import (
        ema_momentum,
        normalize_cosh_brake,
        orthogonalize_newton_schulz,
        scale_by_shape,
    )

    assert [t.name for t in scale_by_muon().transforms] == [
        "ema_momentum",
        "orthogonalize_newton_schulz",
        "scale_by_shape",
    ]
    assert [t.name for t in scale_by_auon().transforms] == ["ema_momentum", "normalize_cosh_brake", "scale_by_shape"]
    # Composed by hand, the steps are Muon itself, bitwise in float32.
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    a, b = [nn.Parameter(w.clone()) for w in init], [nn.Parameter(w.clone()) for w in init]
    opt_a = create("muon", a, lr=0.05)
    opt_b = ChainOptimizer(b, chain(ema_momentum(), orthogonalize_newton_schulz(), scale_by_shape()), lr=0.05)
    for t in range(5):
        for i, (pa, pb) in enumerate(zip(a, b, strict=True)):
            pa.grad = pb.grad = fake_grad(pa.detach(), torch.zeros_like(pa), t, i)
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b, strict=True))
    # AuON's brake alone: unit Frobenius norm up to the cosh factor sqrt(1 + γ²/n) (see the test above).
    x = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    (y,), _ = normalize_cosh_brake().update([x], {}, [x], {"gamma": 1.5})
    assert math.isclose(y.norm().item(), 1 / math.sqrt(1 + 1.5**2 / 4096), rel_tol=1e-5)


def test_ns_dtype_bfloat16_from_create_runs_newton_schulz_in_bfloat16():
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.zeros(24, 16))  # so that the step is exactly -update
    g = torch.randn(24, 16, generator=gen)
    opt = create("muon", [w], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.bfloat16)
    w.grad = g
    opt.step()
    expected = newton_schulz(g, dtype=torch.bfloat16) * 1.5**0.5  # 24/16 rows per column
    assert torch.equal(-w.detach(), expected)  # the same bf16 arithmetic, bitwise
    assert not torch.equal(expected, newton_schulz(g) * 1.5**0.5)  # and not the float32 iteration
    assert (expected - newton_schulz(g) * 1.5**0.5).abs().max() < 0.05
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["param_groups"][0]["ns_dtype"] == torch.bfloat16
    with pytest.raises(ValueError, match="ns_dtype"):
        create("muon", [w], ns_dtype=torch.int8)
