"""Lion, Lion-𝒦, diffGrad, SPAM and Stable-SPAM against float64 references written from the papers' equations.

Each reference below is a plain per-tensor loop that shares no code with the library.
"""

import math

import pytest
import torch
from torch import nn

from trainlab.optim import create
from trainlab.optim.transforms import clip_spikes, normalize_gradient_norm, scale_by_spam_adam

STEPS = 60
SPIKES = {17: 300.0, 38: 1000.0}  # planted gradient spikes (step: factor), so the clipping paths run


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _gradients(model, step, set_to_none=True):
    """Fill ``.grad`` with the gradient of a fixed batch of ``step``, spikes included."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64)
    model.zero_grad(set_to_none=set_to_none)
    nn.functional.mse_loss(model(x), y).backward()
    if step in SPIKES:
        for p in model.parameters():
            p.grad.mul_(SPIKES[step])


def _run_ours(name, hp, steps=STEPS, set_to_none=True):
    model = _model()
    optimizer = create(name, model.parameters(), **hp)
    for step in range(steps):
        _gradients(model, step, set_to_none)
        optimizer.step()
    return model


def _run_reference(step_fn, steps=STEPS, set_to_none=True):
    """``step_fn(k, params, grads, states)`` updates the params in place at global step k = 1, 2, ..."""
    model = _model()
    params = list(model.parameters())
    states = [{} for _ in params]
    for step in range(steps):
        _gradients(model, step, set_to_none)
        with torch.no_grad():
            step_fn(step + 1, params, [p.grad for p in params], states)
    return model


def _max_relative_error(a, b):
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in pairs)


# ----------------------------------------------------------------------------- references


def lion_reference(lr, betas, wd, k):
    b1, b2 = betas

    def step(t, params, grads, states):
        for p, g, s in zip(params, grads, states, strict=True):
            m = s.setdefault("m", torch.zeros_like(p))
            p.mul_(1 - lr * wd)
            c = b1 * m + (1 - b1) * g
            p.sub_(lr * (torch.sign(c) if k == "l1" else c / c.norm()))
            s["m"] = b2 * m + (1 - b2) * g

    return step


def diffgrad_reference(lr, betas, eps, wd):
    b1, b2 = betas

    def step(t, params, grads, states):
        for p, g, s in zip(params, grads, states, strict=True):
            g = g + wd * p
            m = s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
            v = s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
            xi = 1 / (1 + torch.exp(-(s.get("prev", torch.zeros_like(g)) - g).abs()))
            s["prev"] = g.clone()
            p.sub_(lr * math.sqrt(1 - b2**t) / (1 - b1**t) * xi * m / (v.sqrt() + eps))

    return step


def spam_reference(lr, betas, eps, theta, interval, warmup, n_acc, wd):
    """SPAM.py's loop: global step count, reset of m and v only, warmup counter reset after the step before."""
    b1, b2 = betas
    counter = {"current": warmup + 1}  # no warmup before the first reset

    def cosine_decay(j):  # CosineDecay(0.99, warmup).get_dr(j): CosineAnnealingLR(T_max = warmup + 1) at epoch j
        return 0.0 if j >= warmup else 0.99 * (1 + math.cos(math.pi * j / (warmup + 1))) / 2

    def step(t, params, grads, states):
        scale = 1 - cosine_decay(counter["current"])
        for p, g, s in zip(params, grads, states, strict=True):
            g = g.clone()
            if "m" not in s or t % interval == 0:
                s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
            if t >= n_acc and t % interval >= n_acc:
                mask = g**2 > theta * s["v"]
                g[mask] = torch.sign(g[mask]) * torch.sqrt(theta * s["v"][mask])
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            p.mul_(1 - lr * wd)  # decoupled decay before the step, as trainlab does (SPAM.py decays after it)
            p.sub_(lr * scale * math.sqrt(1 - b2**t) / (1 - b1**t) * s["m"] / (s["v"].sqrt() + eps))
        counter["current"] += 1
        if (t + 1) % interval == 0:
            counter["current"] = 0

    return step


def stable_spam_reference(lr, betas, eps, gammas, interval, wd):
    b1, b2 = betas
    g1, g2, g3 = gammas
    adam_step = {"t": 0}

    def step(t, params, grads, states):
        if t % interval == 0:
            adam_step["t"] = 1
        else:
            adam_step["t"] += 1
        ta = adam_step["t"]
        for p, g, s in zip(params, grads, states, strict=True):
            g = g.clone()
            if "m" not in s:
                s.update(m=torch.zeros_like(p), v=torch.zeros_like(p), m_max=0.0, m_norm=0.0, v_norm=0.0)
            if t % interval == 0:
                s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
            p.mul_(1 - lr * wd)
            big = g.abs().max()
            s["m_max"] = g3 * s["m_max"] + (1 - g3) * big
            m_max_hat = s["m_max"] / (1 - g3**t)
            mask = g.abs() > m_max_hat
            g[mask] = g[mask] / big * m_max_hat
            nu = g.norm()
            s["m_norm"] = g1 * s["m_norm"] + (1 - g1) * nu
            s["v_norm"] = g2 * s["v_norm"] + (1 - g2) * nu**2
            g = g / nu * (s["m_norm"] / (1 - g1**t)) / (torch.sqrt(s["v_norm"] / (1 - g2**t)) + eps)
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            p.sub_(lr / (1 - b1**ta) * s["m"] / (s["v"].sqrt() / math.sqrt(1 - b2**ta) + eps))

    return step


# (name, hyperparameters, reference): small reset intervals and thresholds so resets, warmups and clipping
# all happen within STEPS.
CASES = {
    "lion": (
        "lion",
        {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1},
        lion_reference(1e-2, (0.9, 0.99), 0.1, "l1"),
    ),
    "lion-k-l2": (
        "lion-k",
        {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.3, "k": "l2"},
        lion_reference(1e-2, (0.8, 0.95), 0.3, "l2"),
    ),
    "diffgrad": (
        "diffgrad",
        {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05},
        diffgrad_reference(1e-2, (0.9, 0.99), 1e-8, 0.05),
    ),
    "spam": (
        "spam",
        {"lr": 1e-2, "theta": 5.0, "reset_interval": 13, "warmup_steps": 5, "n_acc": 3, "weight_decay": 0.1},
        spam_reference(1e-2, (0.9, 0.999), 1e-6, 5.0, 13, 5, 3, 0.1),
    ),
    "stable-spam": (
        "stable-spam",
        {"lr": 1e-2, "reset_interval": 11, "weight_decay": 0.1},
        stable_spam_reference(1e-2, (0.9, 0.999), 1e-8, (0.7, 0.9, 0.999), 11, 0.1),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_papers_equations(case):
    name, hp, reference = CASES[case]
    ours, ref = _run_ours(name, hp), _run_reference(reference)
    assert _max_relative_error(ours, ref) < 1e-10
    assert _max_relative_error(ours, _model()) > 1e-2  # and the parameters really moved


@pytest.mark.parametrize("case", sorted(CASES))
def test_foreach_equals_one_tensor_at_a_time(case):
    name, hp, _ = CASES[case]
    together = _run_ours(name, hp, steps=30)
    model = _model()
    apart = [create(name, [p], **hp) for p in model.parameters()]
    for step in range(30):
        _gradients(model, step)
        for optimizer in apart:
            optimizer.step()
    assert _max_relative_error(together, model) < 1e-14


# ----------------------------------------------------------------------------- convergence


def _rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def _quadratic(x):
    return 0.5 * (torch.arange(1, 11, dtype=x.dtype) * x**2).sum()


CONVERGENCE = {  # name: (hyperparameters, lr on the quadratic, lr on Rosenbrock)
    "lion": ({}, 1e-2, 3e-3),
    "lion-k": ({"k": "l2"}, 3e-2, 3e-3),
    "diffgrad": ({}, 2e-2, 2e-2),
    "spam": ({}, 2e-2, 2e-2),
    "stable-spam": ({}, 5e-3, 2e-2),
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
@pytest.mark.parametrize(
    "problem, start, steps, threshold",
    [(_quadratic, [3.0] * 10, 1000, 1e-2), (_rosenbrock, [-1.5, 2.0], 1500, 0.1)],
    ids=["quadratic", "rosenbrock"],
)
def test_converges(name, problem, start, steps, threshold):
    hp, lr_quadratic, lr_rosenbrock = CONVERGENCE[name]
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = create(name, [x], lr=lr_quadratic if problem is _quadratic else lr_rosenbrock, **hp)
    initial = problem(x).item()
    for _ in range(steps):
        optimizer.zero_grad()
        problem(x).backward()
        optimizer.step()
    assert problem(x).item() < threshold < initial


# ----------------------------------------------------------------------------- Lion-𝒦


def test_lion_l1_moves_every_coordinate_by_lr_and_l2_moves_each_tensor_by_lr():
    torch.manual_seed(0)
    for k in ("l1", "l2"):
        params = [
            nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
            nn.Parameter(torch.randn(5, dtype=torch.float64)),
        ]
        optimizer = create("lion-k", params, k=k, lr=0.01)
        for _ in range(3):
            before = [p.detach().clone() for p in params]
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            for p, b in zip(params, before, strict=True):
                delta = p.detach() - b
                if k == "l1":
                    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 0.01), rtol=1e-12, atol=0)
                else:
                    assert delta.norm().item() == pytest.approx(0.01, rel=1e-12)


def test_lion_l2_of_a_zero_momentum_is_zero():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = create("lion-k", [p], k="l2", lr=0.1)
    p.grad = torch.zeros(3, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- diffGrad


def test_diffgrad_friction_is_in_half_open_unit_interval_and_varies():
    name, hp, _ = CASES["diffgrad"]
    model = _model()
    optimizer = create(name, model.parameters(), **{**hp, "weight_decay": 0.0})
    b1, b2 = hp["betas"]
    frictions = []
    for step in range(20):
        _gradients(model, step)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        t = step + 1
        for p, b in zip(model.parameters(), before, strict=True):
            s = optimizer.state[p]
            adam = hp["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) * s["scale_by_diffgrad.exp_avg"]
            adam = adam / (s["scale_by_diffgrad.exp_avg_sq"].sqrt() + hp["eps"])
            frictions.append(((b - p.detach()) / adam).flatten())
    xi = torch.cat(frictions)
    # ξ = sigmoid(|Δg|) ∈ [0.5, 1); it rounds to 1.0 in float64 for the planted spikes' large |Δg|.
    assert xi.min().item() >= 0.5 - 1e-12 and xi.max().item() <= 1 + 1e-12
    assert ((xi > 0.5 + 1e-6) & (xi < 1 - 1e-6)).float().mean().item() > 0.5
    assert xi.std().item() > 0.01


def test_diffgrad_v1_aliasing_bug_pins_friction_at_one_half_and_ours_does_not():
    """diffGrad v1 stored ``previous_grad = p.grad`` (a reference). With zero_grad(set_to_none=False) the
    next backward writes into that same tensor, so |g_prev − g| = 0 and ξ ≡ sigmoid(0) = 0.5."""
    model = _model()
    aliased: dict[nn.Parameter, torch.Tensor] = {}
    frictions = []
    for step in range(5):
        _gradients(model, step, set_to_none=False)
        for p in model.parameters():
            xi = torch.sigmoid((aliased.get(p, torch.zeros_like(p)) - p.grad).abs())
            aliased[p] = p.grad  # the v1 bug: no clone
            if step > 0:
                frictions.append(xi)
    assert all(torch.equal(xi, torch.full_like(xi, 0.5)) for xi in frictions)

    # Ours, under the same zero_grad(set_to_none=False), equals the reference that copies g_prev ...
    name, hp, reference = CASES["diffgrad"]
    ours = _run_ours(name, hp, set_to_none=False)
    assert _max_relative_error(ours, _run_reference(reference, set_to_none=False)) < 1e-10
    # ... and differs from an update whose friction is pinned at 0.5 (which is Adam with half the lr).
    b1, b2 = hp["betas"]

    def pinned(t, params, grads, states):
        for p, g, s in zip(params, grads, states, strict=True):
            g = g + hp["weight_decay"] * p
            m = s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
            v = s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
            xi = 0.5 if t > 1 else torch.sigmoid(g.abs())
            p.sub_(hp["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) * xi * m / (v.sqrt() + hp["eps"]))

    assert _max_relative_error(ours, _run_reference(pinned, set_to_none=False)) > 1e-3


# ----------------------------------------------------------------------------- Stable-SPAM's AdaGN


def _normalize(norms, dim=30):
    transform, group = normalize_gradient_norm(), {"gamma1": 0.7, "gamma2": 0.9, "eps": 1e-8}
    torch.manual_seed(0)
    p = torch.zeros(dim, dtype=torch.float64)
    state = {k: [v] for k, v in transform.init(p, group).items()}
    out = []
    for n in norms:
        g = torch.randn(dim, dtype=torch.float64)
        (u,), state = transform.update([g / g.norm() * n], state, [p], group)
        out.append(u.norm().item())
    return out


def test_normalized_gradient_norm_is_one_for_constant_norms():
    assert _normalize([3.7] * 50)[-1] == pytest.approx(1.0, abs=1e-3)


def test_normalized_gradient_norm_follows_its_ema_and_damps_a_spike():
    gen = torch.Generator().manual_seed(1)
    norms = (torch.rand(40, generator=gen, dtype=torch.float64) * 2 + 0.5).tolist()
    norms[30] *= 1000
    got = _normalize(norms)
    m = v = 0.0
    for k, (n, u) in enumerate(zip(norms, got, strict=True), start=1):
        m, v = 0.7 * m + 0.3 * n, 0.9 * v + 0.1 * n * n
        assert u == pytest.approx((m / (1 - 0.7**k)) / (math.sqrt(v / (1 - 0.9**k)) + 1e-8), rel=1e-12)
    assert got[30] < 1.05  # a 1000x gradient leaves with norm about 1


def test_all_zero_gradients_still_enter_the_norm_emas_as_in_the_official_code():
    """stablespam.py updates m_norm_t, v_norm_t with grad_norm = 0 and only skips the rescaling."""
    norms = [2.0, 3.0, 0.0, 0.0, 2.5, 1.5]
    got = _normalize(norms)
    m = v = 0.0
    for k, (n, u) in enumerate(zip(norms, got, strict=True), start=1):
        m, v = 0.7 * m + 0.3 * n, 0.9 * v + 0.1 * n * n
        expected = (m / (1 - 0.7**k)) / (math.sqrt(v / (1 - 0.9**k)) + 1e-8) if n > 0 else 0.0
        assert u == pytest.approx(expected, rel=1e-12, abs=0.0), k
    # skipping the zeros in the EMAs (the old behaviour) gives 0.9709 at step 5
    assert got[4] == pytest.approx(0.7447, abs=1e-4)


def test_all_zero_gradient_stays_zero_in_stable_spam():
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = create("stable-spam", [p], lr=0.1)
    p.grad = torch.zeros(4, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.float64))


# ----------------------------------------------------------------------------- SPAM's clipping


def test_spam_clips_a_planted_spike_to_sqrt_theta_v():
    theta, beta2 = 5000.0, 0.999
    group = {"betas": (0.9, beta2), "eps": 1e-6, "reset_interval": 500, "warmup_steps": 150, "theta": theta, "n_acc": 5}
    transform = clip_spikes(scale_by_spam_adam())
    p = torch.zeros(50, dtype=torch.float64)
    state = {k: [v] for k, v in transform.init(p, group).items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        (_, state) = transform.update([torch.randn(50, generator=gen, dtype=torch.float64)], state, [p], group)
    v_before = state["exp_avg_sq"][0].clone()
    spike = torch.randn(50, generator=gen, dtype=torch.float64)
    spike[7] = 1000.0 * v_before[7].sqrt() * math.sqrt(theta)  # far above sqrt(θ·v)
    spike_copy = spike.clone()
    transform.update([spike], state, [p], group)
    v_after = state["exp_avg_sq"][0]
    clipped = math.sqrt(theta * v_before[7].item())
    assert v_after[7].item() == pytest.approx(beta2 * v_before[7].item() + (1 - beta2) * clipped**2, rel=1e-12)
    kept = (spike**2 <= theta * v_before).nonzero().flatten()
    assert 7 not in kept.tolist() and len(kept) == 49
    torch.testing.assert_close(
        v_after[kept], beta2 * v_before[kept] + (1 - beta2) * spike[kept] ** 2, rtol=1e-12, atol=0
    )
    assert torch.equal(spike, spike_copy)  # the caller's gradient is not written into


def test_spam_does_not_clip_right_after_a_reset():
    # At the reset step v is zero, so clipping would zero the gradient; SPAM waits n_acc steps.
    group = {"betas": (0.9, 0.999), "eps": 1e-6, "reset_interval": 4, "warmup_steps": 2, "theta": 1.0, "n_acc": 2}
    transform = clip_spikes(scale_by_spam_adam())
    p = torch.zeros(3, dtype=torch.float64)
    state = {k: [v] for k, v in transform.init(p, group).items()}
    for _ in range(4):  # the 4th step resets
        transform.update([torch.ones(3, dtype=torch.float64) * 10], state, [p], group)
    assert state["exp_avg"][0].tolist() == pytest.approx([1.0] * 3)  # (1 − β1)·10 from zero: unclipped
    assert state["step"][0].item() == 4  # the bias-correction count is not reset


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("lion", {"betas": (0.9, 1.0)}, "betas"),
        ("lion-k", {"k": "l3"}, "k must be one of"),
        ("diffgrad", {"eps": 0.0}, "eps"),
        ("diffgrad", {"weight_decay": -1.0}, "weight_decay"),
        ("spam", {"theta": 0.0}, "theta"),
        ("spam", {"reset_interval": 0}, "reset_interval"),
        ("spam", {"n_acc": 1}, "n_acc"),
        ("spam", {"warmup_steps": 1.5}, "warmup_steps"),
        ("stable-spam", {"gamma2": 1.0}, "gamma2"),
        ("stable-spam", {"gamma3": -0.1}, "gamma3"),
    ],
)
def test_impossible_hyperparameters_are_named(name, bad, match):
    with pytest.raises(ValueError, match=match):
        create(name, _model().parameters(), **bad)


def test_per_group_overrides_are_validated_too():
    model = _model()
    with pytest.raises(ValueError, match="theta"):
        create(
            "spam", [{"params": list(model[0].parameters()), "theta": -1.0}, {"params": list(model[2].parameters())}]
        )
