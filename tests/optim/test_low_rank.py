"""GaLore, FRUGAL, COSMOS and GradNormLoRP against float64 references written from their equations."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from trainlab.optim import ChainOptimizer, chain, create, state_bytes
from trainlab.optim.transforms import (
    ScaleByWeightNormProjection,
    newton_schulz,
    project_subspace,
    scale_by_adam_raw_eps,
)
from trainlab.optim.transforms.projection import resolve_rank

torch.set_num_threads(1)

SHAPES = [(6, 4), (6, 4), (3, 7), (5, 2, 2)]  # two of one shape, a wide one, a conv-like one


def make_params(shapes=SHAPES, dtype=torch.float64) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def grad(p: torch.Tensor, step: int, i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + i)
    return (p.detach() + torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)).clone()


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = grad(p, t, i)
        opt.step()


# ---- GaLore ----


def ref_galore(shapes, steps, rank, gap, lr, scale, betas=(0.9, 0.999), eps=1e-6):
    """galore_torch.AdamW per tensor: SVD when iter % gap == 0, transformers-style Adam, project back × scale."""
    params = [p.detach().clone() for p in make_params(shapes)]
    b1, b2 = betas
    state = [{} for _ in params]
    for t in range(steps):
        for i, p in enumerate(params):
            st, g = state[i], grad(p, t, i).reshape(p.shape[0], -1)
            m, n = g.shape
            r = min(rank, m, n)
            if t % gap == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                st["P"] = vh[:r] if m >= n else u[:, :r]
            low = g @ st["P"].T if m >= n else st["P"].T @ g
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(low), torch.zeros_like(low)
            st["m"] = b1 * st["m"] + (1 - b1) * low
            st["v"] = b2 * st["v"] + (1 - b2) * low**2
            k = t + 1
            n_ = st["m"] / (st["v"].sqrt() + eps) * math.sqrt(1 - b2**k) / (1 - b1**k)
            back = n_ @ st["P"] if m >= n else st["P"] @ n_
            p -= lr * scale * back.reshape(p.shape)
    return params


def test_galore_matches_reference_across_refreshes():
    params = make_params()
    opt = create("galore", params, rank=2, update_proj_gap=3, lr=0.05)
    run(opt, params, 8)
    ref = ref_galore(SHAPES, 8, rank=2, gap=3, lr=0.05, scale=0.25)
    for p, q in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-12, rtol=0)
    assert opt.state[params[0]]["project_subspace.inner.exp_avg"].shape == (6, 2)  # low-rank moments
    assert opt.state[params[2]]["project_subspace.inner.exp_avg"].shape == (2, 7)


def test_rank_fraction_and_cap():
    assert resolve_rank(0.25, (128, 64)) == 16
    assert resolve_rank(0.25, (10, 128)) == 3  # 2.5 rounds half up
    assert resolve_rank(0.01, (10, 128)) == 1  # a positive fraction keeps at least one direction
    assert resolve_rank(0.0, (10, 128)) == 0
    assert resolve_rank(500, (10, 128)) == 10


# ---- moments on refresh: GaLore keeps them, FRUGAL resets them (both selectable) ----


@pytest.mark.parametrize("name", ["galore", "frugal"])
@pytest.mark.parametrize("reset", [False, True])
def test_moments_on_refresh(name, reset):
    params = make_params([(6, 4)])
    size = {"rank": 2, "update_proj_gap": 2} if name == "galore" else {"density": 0.5, "update_gap": 2}
    opt = create(name, params, reset_statistics=reset, **size)
    run(opt, params, 3)  # refreshes before steps 0 and 2
    st = opt.state[params[0]]
    prefix = "project_subspace."
    assert st[prefix + "step"].item() == 3
    assert st[prefix + "inner.step"].item() == (1 if reset else 3)
    # one Adam step since a reset leaves m = (1 − β1)·R and v = (1 − β2)·R², so v = 0.1·m²; kept moments do not
    m, v = st[prefix + "inner.exp_avg"], st[prefix + "inner.exp_avg_sq"]
    assert torch.allclose(v, 0.1 * m**2, atol=1e-12, rtol=1e-9) == reset


def test_default_reset_rules():
    assert create("galore", make_params()).defaults["reset_statistics"] is False
    assert create("frugal", make_params()).defaults["reset_statistics"] is True


# ---- FRUGAL ----


@pytest.mark.parametrize("projection", ["blocks", "random"])
def test_frugal_density_one_is_adamw(projection):
    hp = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    a, b = make_params(), make_params()
    # refreshes every 2 steps; without the reset the subspace (every coordinate, in order) never changes
    run(create("frugal", a, density=1.0, projection=projection, update_gap=2, reset_statistics=False, **hp), a, 7)
    run(create("adamw", b, **hp), b, 7)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)


def test_frugal_residual_gets_sign_sgd():
    """density 0.5 blocks on one step: active columns get Adam's first step (±1), the rest ±inactive_lr_scale."""
    p = make_params([(4, 4)])
    g = grad(p[0], 0, 0)
    before = p[0].detach().clone()
    opt = create("frugal", p, density=0.5, projection="blocks", lr=1.0, inactive_lr_scale=0.1)
    p[0].grad = g
    opt.step()
    step = before - p[0].detach()
    first_adam = g / (g.abs() + 1e-8)
    torch.testing.assert_close(step[:, :2], first_adam[:, :2], atol=1e-12, rtol=0)  # block 0 = columns 0, 1
    torch.testing.assert_close(step[:, 2:], 0.1 * g[:, 2:].sign(), atol=1e-12, rtol=0)


def test_frugal_svd_step_is_projected_adam_plus_sign_of_residual():
    p = make_params([(6, 4)])
    g = grad(p[0], 0, 0)
    before = p[0].detach().clone()
    opt = create("frugal", p, density=0.5, lr=1.0, inactive_lr_scale=0.1)
    p[0].grad = g
    opt.step()
    q = torch.linalg.svd(g, full_matrices=False)[2][:2].T  # top-2 right singular vectors (6 >= 4: columns)
    low = g @ q
    expected = (low / (low.abs() + 1e-8)) @ q.T + 0.1 * (g - low @ q.T).sign()
    torch.testing.assert_close(before - p[0].detach(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frugal_svd_density_one_adds_no_sign_step(dtype):
    """At density 1 the residual is empty: the step is AdamW's alone (SVD bases rotate the moments, so
    compare the first step, where Adam's step is ±lr per entry in any basis: |step| ≤ lr·(1 + 1e-5))."""
    p = make_params([(6, 4)], dtype=dtype)
    before = p[0].detach().clone()
    opt = create("frugal", p, density=1.0, lr=1.0, inactive_lr_scale=1.0)
    p[0].grad = grad(p[0], 0, 0)
    opt.step()
    g = p[0].grad.double()
    q = torch.linalg.svd(g, full_matrices=False)[2].T  # every right singular vector
    low = g @ q
    expected = (low / (low.abs() + 1e-8)) @ q.T  # Adam's first step in the rotated basis, nothing else
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close((before - p[0].detach()).double(), expected, atol=tol, rtol=0)


def test_frugal_svd_refresh_on_a_low_rank_gradient_adds_no_sign_step_but_later_steps_do():
    """A rank-2 gradient at a refresh with rank 4: its residual is empty, so the step is projected Adam
    alone. At the next (non-refresh) step a full-rank gradient has a genuine residual: inactive_lr_scale·sign."""
    p = make_params([(8, 8)])
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(8, 2, generator=gen, dtype=torch.float64), torch.randn(2, 8, generator=gen, dtype=torch.float64)
    opt = create("frugal", p, density=0.5, lr=1.0, inactive_lr_scale=0.1, update_gap=10)
    before = p[0].detach().clone()
    p[0].grad = u @ v
    opt.step()
    q = next(t for k, t in opt.state[p[0]].items() if k.endswith("basis"))  # 8 x 4: m >= n projects columns
    low = (u @ v) @ q
    torch.testing.assert_close(before - p[0].detach(), (low / (low.abs() + 1e-8)) @ q.T, atol=1e-12, rtol=0)
    before = p[0].detach().clone()
    p[0].grad = g = grad(p[0], 1, 0)
    opt.step()
    outside = (before - p[0].detach()) - (before - p[0].detach()) @ q @ q.T  # Adam's part lies in span(q)
    residual_sign = (g - g @ q @ q.T).sign()
    torch.testing.assert_close(outside, 0.1 * (residual_sign - residual_sign @ q @ q.T), atol=1e-12, rtol=0)


def test_random_projection_is_reproducible_and_sorted():
    p = make_params([(8, 16)])
    opt = create("frugal", p, density=0.5, projection="random", update_gap=1)
    run(opt, p, 3)
    idx = opt.state[p[0]]["project_subspace.index"]
    assert idx.numel() == 4 and torch.equal(idx, idx.sort().values) and idx.unique().numel() == 4


# ---- COSMOS ----


def ref_cosmos(shapes, steps, rank, lr, gamma, lr_ratio, betas, eps):
    """The COSMOS equations (spec section 3), per tensor, float64."""
    params = [p.detach().clone() for p in make_params(shapes)]
    b1, b2 = betas
    state = [{} for _ in params]
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            st, g = state[i], grad(p, t - 1, i).reshape(p.shape[0], -1)
            m, n = g.shape
            r = min(rank, n)
            st["M"] = b1 * st.get("M", torch.zeros_like(g)) + g
            if t == 1:
                _, s, vh = torch.linalg.svd(g, full_matrices=False)
                st["U"], st["S"] = vh[:r].T, (1 - b2) * torch.diag(s[:r] ** 2)
                st["V"] = torch.zeros(m, r, dtype=g.dtype)
            else:
                old = st["U"]
                st["U"] = torch.linalg.qr(b2 * old @ st["S"] + (1 - b2) * g.T @ (g @ old))[0]
                T = old.T @ st["U"]
                gu = g @ st["U"]
                st["S"] = b2 * T.T @ st["S"] @ T + (1 - b2) * gu.T @ gu
            U = st["U"]
            st["V"] = b2 * st["V"] + (1 - b2) * (g @ U) ** 2
            bc1 = (1 - b1**t) / (1 - b1)
            gt = (g + b1 * st["M"]) / (1 + b1 * bc1)
            A = (gt @ U / ((st["V"] / (1 - b2**t)).sqrt() + eps)) @ U.T
            if r < n:
                R = newton_schulz(gt - gt @ U @ U.T)
                R = math.sqrt(m * n) * R / (R.norm() + 1e-7)
            else:  # U spans every input: the residual is exactly zero, and so is R
                R = torch.zeros_like(gt)
            D = A + gamma * R
            p -= lr * lr_ratio * math.sqrt(m * n) * (D / (D.norm() + 1e-7)).reshape(p.shape)
    return params


def test_cosmos_matches_reference():
    params = make_params()
    opt = create("cosmos", params, rank=2, lr=0.1)
    run(opt, params, 4)
    ref = ref_cosmos(SHAPES, 4, rank=2, lr=0.1, gamma=0.2, lr_ratio=0.1, betas=(0.9, 0.999), eps=1e-8)
    for p, q in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cosmos_basis_covering_every_input_has_no_residual_term(dtype):
    """rank 64 on a 12x4 matrix: U spans all 4 inputs, so R = 0 and the step is the adapted part alone.

    Before the fix, NS5 and the √(mn) normalization turned the float rounding residue into a full-size
    random term (as in the official code): the float32 steps then differed from the exact ones by ~20%.
    """
    params = make_params([(12, 4)], dtype=dtype)
    run(create("cosmos", params, rank=64, lr=0.1), params, 5)
    (ref,) = ref_cosmos([(12, 4)], 5, rank=64, lr=0.1, gamma=0.2, lr_ratio=0.1, betas=(0.9, 0.999), eps=1e-8)
    start = make_params([(12, 4)])[0].detach()
    moved, expected = params[0].detach().double() - start, ref - start
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((moved - expected).norm() / expected.norm()).item() < tol


# ---- GradNormLoRP ----


def test_gradnorm_lorp_reparametrization_exact_at_init():
    p = make_params([(6, 4)])
    w0 = p[0].detach().clone()
    opt = create("gradnorm-lorp", p, rank=2, lr=0.0)
    p[0].grad = grad(p[0], 0, 0)
    opt.step()
    st = opt.state[p[0]]
    torch.testing.assert_close(st["weight_norm_projection.gain"], w0.norm(dim=1), atol=1e-15, rtol=0)
    torch.testing.assert_close(p[0].detach(), w0, atol=1e-15, rtol=0)


def ref_weight_norm_adam(shape, steps, lr, scale, betas=(0.9, 0.999), eps=1e-6, wd=0.0):
    """Unprojected weight-norm Adam: V, g leaves, W = g V/|V|_row by autograd; transformers-style Adam on
    both (V's step times ``scale``), decoupled decay on both."""
    w0 = make_params([shape])[0].detach()
    V = w0.clone().requires_grad_()
    g = w0.norm(dim=1).requires_grad_()
    b1, b2 = betas
    mom = {id(V): [torch.zeros_like(V), torch.zeros_like(V)], id(g): [torch.zeros_like(g), torch.zeros_like(g)]}
    for t in range(steps):
        W = g[:, None] * V / V.norm(dim=1, keepdim=True)
        (W * grad(W, t, 0)).sum().backward()  # dL/dW = the test's gradient at W
        with torch.no_grad():
            for x, s in ((V, scale), (g, 1.0)):
                m, v = mom[id(x)]
                m.mul_(b1).add_((1 - b1) * x.grad)
                v.mul_(b2).add_((1 - b2) * x.grad**2)
                k = t + 1
                x.mul_(1 - lr * wd)
                x -= lr * s * m / (v.sqrt() + eps) * math.sqrt(1 - b2**k) / (1 - b1**k)
                x.grad = None
    with torch.no_grad():
        return g[:, None] * V / V.norm(dim=1, keepdim=True)


def test_gradnorm_lorp_full_rank_equals_weight_norm_adam():
    """With an every-coordinate projector the projected step is the identity, so GradNormLoRP must be
    exactly weight-norm Adam (the SVD projector at full rank is a rotation, under which Adam is not
    invariant)."""
    p = make_params([(6, 4)])
    identity_subspace = project_subspace("blocks", scale_by_adam_raw_eps())
    transform = ScaleByWeightNormProjection(identity_subspace, scale_by_adam_raw_eps())
    opt = ChainOptimizer(p, chain(transform), lr=0.02, rank=1.0, scale=0.25, weight_decay=0.1, eps=1e-6)
    run(opt, p, 6)
    torch.testing.assert_close(p[0].detach(), ref_weight_norm_adam((6, 4), 6, 0.02, 0.25, wd=0.1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["galore", "frugal", "cosmos", "gradnorm-lorp"])
def test_non_contiguous_parameter_is_updated(name):
    """A non-contiguous conv-like weight (its (out, -1) matrix is then a copy) gets the same update as its
    contiguous copy."""
    base = make_params([(4, 3, 2)])[0].detach()
    strided = nn.Parameter(base.permute(2, 1, 0).contiguous().permute(2, 1, 0))  # same values, other strides
    dense = nn.Parameter(base.clone())
    assert not strided.is_contiguous()
    for p in (strided, dense):
        run(create(name, [p], lr=0.05), [p], 3)
    assert not torch.equal(dense, base)
    torch.testing.assert_close(strided.detach(), dense.detach(), atol=1e-12, rtol=0)


# ---- state bytes == formula ----


def low_rank_floats(m: int, n: int, r: int) -> int:
    return r * (2 * max(m, n) + min(m, n))  # GaLore: moments m×r (or r×n) twice, projector side×r


@pytest.mark.parametrize(
    ("name", "hp", "per_matrix"),
    [
        ("galore", {"rank": 0.25}, lambda m, n, r: 4 * low_rank_floats(m, n, r) + 2 * 4),
        ("frugal", {"density": 0.25}, lambda m, n, r: 4 * low_rank_floats(m, n, r) + 2 * 4),
        ("frugal", {"density": 0.25, "projection": "blocks"}, lambda m, n, r: 8 * r * max(m, n) + 8 * r + 8 + 8),
        ("frugal", {"density": 0.25, "projection": "random"}, lambda m, n, r: 8 * r * max(m, n) + 8 * r + 16 + 8),
        ("cosmos", {"rank": 0.25}, lambda m, n, r: 4 * (m * n + m * r + n * r + r * r) + 4),
        ("gradnorm-lorp", {"rank": 0.25}, lambda m, n, r: 4 * (low_rank_floats(m, n, r) + 4 * m) + 3 * 4),
    ],
)
def test_state_bytes_formula(name, hp, per_matrix):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))  # 128×64 and 10×128
    opt = create(name, model.named_parameters(), **hp)
    nn.functional.cross_entropy(model(torch.randn(8, 64)), torch.arange(8)).backward()
    opt.step()
    matrices = per_matrix(128, 64, 16) + per_matrix(10, 128, 3)
    biases = (8 * 128 + 4) + (8 * 10 + 4)  # AdamW on the 1-D biases: m, v and a float32 step counter
    assert state_bytes(opt) == matrices + biases


# ---- routing ----


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 16, bias=False)


@pytest.mark.parametrize("name", ["galore", "frugal", "cosmos", "gradnorm-lorp"])
def test_routing(name):
    model = TinyLM()

    def routed(**hp) -> set[str]:
        groups = create(name, model.named_parameters(), **hp).param_groups
        return set(next(g for g in groups if g["chain"] == name)["param_names"])

    assert routed() == {"fc.weight"}
    assert routed(exclude=None) == {"embed.weight", "fc.weight", "lm_head.weight"}  # 1-D: always AdamW
    plain = create(name, list(model.parameters())).param_groups  # no names: only the dimensionality rule
    assert {id(p) for g in plain if g["chain"] == name for p in g["params"]} == {
        id(model.embed.weight),
        id(model.fc.weight),
        id(model.lm_head.weight),
    }


NAMED = {  # 2-D unless noted; which chain the default rule sends each to
    "blocks.0.attn.qkv.weight": "method",
    "blocks.0.mlp.fc.weight": "method",
    "conv.weight": "method",  # 4-D: flattened to (out, in*k*k)
    "blocks.0.attn.qkv.bias": "adamw",  # 1-D
    "blocks.0.ln1.weight": "adamw",  # 1-D (and a norm name)
    "model.norm.weight": "adamw",
    "blocks.0.layernorm.weight": "adamw",
    "blocks.0.ln_2.weight": "adamw",
    "model.rms_norm.scale": "adamw",
    "ln_f.weight": "adamw",
    "transformer.wte.weight": "adamw",
    "transformer.wpe.weight": "adamw",
    "model.embed_tokens.weight": "adamw",
    "lm_head.weight": "adamw",
    "classifier.head.weight": "adamw",
}


@pytest.mark.parametrize("name", ["galore", "frugal", "cosmos", "gradnorm-lorp"])
def test_routing_name_patterns(name):
    """Norm, embedding and head names go to AdamW even when 2-D; the pattern is configurable."""
    gen = torch.Generator().manual_seed(0)

    def tensor(key: str) -> nn.Parameter:
        shape = (4,) if key.endswith(("bias", "ln1.weight")) else (3, 2, 2, 2) if key == "conv.weight" else (4, 3)
        return nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))

    def routed(**hp) -> dict[str, str]:
        groups = create(name, [(k, tensor(k)) for k in NAMED], **hp).param_groups
        return {k: ("method" if g["chain"] == name else g["chain"]) for g in groups for k in g["param_names"]}

    assert routed() == NAMED
    custom = routed(exclude=r"(^|\.)mlp\.")
    assert {k for k, v in custom.items() if v == "method"} == {
        "blocks.0.attn.qkv.weight",
        "conv.weight",
        "model.norm.weight",
        "blocks.0.layernorm.weight",
        "blocks.0.ln_2.weight",
        "model.rms_norm.scale",
        "ln_f.weight",
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "classifier.head.weight",
    }


# ---- checkpoints: state_dict round trip continues bitwise, across a refresh ----


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("galore", {"rank": 2, "update_proj_gap": 3}),
        ("frugal", {"density": 0.5, "projection": "random", "update_gap": 3}),
        ("frugal", {"density": 0.5, "projection": "blocks", "update_gap": 3}),
        ("cosmos", {"rank": 2}),
        ("gradnorm-lorp", {"rank": 2, "update_proj_gap": 3}),
    ],
)
def test_state_dict_continues_bitwise(name, hp):
    shapes = [(6, 4), (3, 7)]
    full = make_params(shapes, torch.float32)
    torch.manual_seed(0)  # the random projector draws its per-matrix seed at init
    run(create(name, full, **hp), full, 8)
    first = make_params(shapes, torch.float32)
    torch.manual_seed(0)
    opt = create(name, first, **hp)
    run(opt, first, 2)  # the next refresh is before step 3
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)  # a fresh process: the global RNG is elsewhere, the run must not depend on it
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = create(name, resumed, **hp)
    opt2.load_state_dict(saved["optimizer"])
    run(opt2, resumed, 6, start=2)
    for p, q in zip(resumed, full, strict=True):
        assert torch.equal(p, q)


# ---- bad arguments ----


@pytest.mark.parametrize(
    ("name", "hp", "word"),
    [
        ("galore", {"rank": 0}, "rank"),
        ("galore", {"rank": -2}, "rank"),
        ("galore", {"rank": 1.5}, "rank"),
        ("galore", {"rank": True}, "rank"),
        ("galore", {"rank": "8"}, "rank"),
        ("cosmos", {"rank": 0.0}, "rank"),
        ("gradnorm-lorp", {"rank": -0.5}, "rank"),
        ("frugal", {"density": -0.1}, "density"),
        ("frugal", {"density": 1.5}, "density"),
        ("frugal", {"density": True}, "density"),
        ("frugal", {"projection": "qr"}, "projection"),
        ("frugal", {"inactive_update_rule": "adam"}, "inactive_update_rule"),
        ("frugal", {"inactive_lr_scale": -1.0}, "inactive_lr_scale"),
        ("frugal", {"update_gap": 0}, "update_gap"),
        ("galore", {"update_proj_gap": 0}, "update_proj_gap"),
        ("galore", {"update_proj_gap": 2.5}, "update_proj_gap"),
        ("gradnorm-lorp", {"update_proj_gap": -1}, "update_proj_gap"),
        ("galore", {"scale": -0.25}, "scale"),
        ("galore", {"betas": (0.9,)}, "betas"),
        ("frugal", {"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ("cosmos", {"eps": -1e-8}, "eps"),
        ("gradnorm-lorp", {"weight_decay": -0.1}, "weight_decay"),
        ("cosmos", {"gamma": -0.2}, "gamma"),
        ("cosmos", {"lr_ratio": 0.0}, "lr_ratio"),
        ("galore", {"lr": -1.0}, "lr"),
        ("galore", {"density": 0.25}, "density"),  # unknown keyword for GaLore
        ("frugal", {"rank": 4}, "rank"),  # unknown keyword for FRUGAL
        ("cosmos", {"exclude": "("}, "exclude"),
        ("galore", {"exclude": 3}, "exclude"),
    ],
)
def test_bad_arguments(name, hp, word):
    with pytest.raises(ValueError, match=word):
        create(name, make_params(), **hp)


@pytest.mark.parametrize("name", ["galore", "frugal", "cosmos", "gradnorm-lorp"])
def test_vectors_cannot_be_projected(name):
    """A 1-D tensor routed to the projected chain by hand is refused, with the routing hint."""
    opt = create(name, make_params([(6, 4)]))
    vector = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt.add_param_group({"params": [vector], "chain": name})
    vector.grad = torch.ones_like(vector)
    with pytest.raises(ValueError, match=r"2\+ dimensions"):
        opt.step()


def test_gradnorm_lorp_refuses_zero_rows():
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = create("gradnorm-lorp", [p])
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="zero row"):
        opt.step()


# ---- the apply contract: the projected step accumulated into the parameter ----


@pytest.mark.parametrize(
    "name, hp",
    [
        ("galore", {"rank": 2, "update_proj_gap": 2, "scale": 0.25, "weight_decay": 0.1}),
        ("frugal", {"density": 0.5, "update_gap": 2, "inactive_lr_scale": 0.1}),
        ("frugal", {"density": 0.5, "update_gap": 2, "projection": "random", "inactive_update_rule": "sgd"}),
        ("frugal", {"density": 0.5, "update_gap": 2, "projection": "blocks", "reset_statistics": False}),
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "foreach-adam"])
def test_low_rank_apply_equals_update_then_add(name, hp, fused, monkeypatch):
    """ProjectSubspace.apply (addmm_/index_add_ into the parameter; Adam by torch's fused kernel, or, off the CPU
    or for other dtypes, by foreach ops with its bias factor folded into the step size) against update +
    ``param -= lr·update``, in float64 over 5 steps with two refreshes."""
    from trainlab.optim.transforms import projection

    if not fused:
        monkeypatch.setattr(projection, "_FUSED_ADAM_DTYPES", ())
    lr = 0.01
    torch.manual_seed(0)
    applied = make_params()
    opt = create(name, applied, lr=lr, **hp)
    torch.manual_seed(0)
    added = make_params()
    ref = create(name, added, lr=lr, **hp)
    for t in range(5):
        for i, (p, q) in enumerate(zip(applied, added, strict=True)):
            p.grad, q.grad = grad(p, t, i), grad(q, t, i)
        torch.manual_seed(t)  # the random projection draws its seeds from the global RNG at the first step
        opt.step()
        torch.manual_seed(t)
        (group,) = ref.param_groups  # every parameter here has 2+ dimensions: one group, the method's chain
        chain_ = ref.chains[group["chain"]]
        params = group["params"]
        for p in params:
            if not ref.state[p]:
                ref.state[p].update(chain_.init(p, group))
        state = {k: [ref.state[p][k] for p in params] for k in ref.state[params[0]]}
        with torch.no_grad():  # the same chain, stepped through update and the shell's add
            out, state = chain_.update([p.grad for p in params], state, params, group)
            torch._foreach_add_(params, out, alpha=-lr)
        for k, tensors in state.items():
            for p, v in zip(params, tensors, strict=True):
                ref.state[p][k] = v
    for p, q in zip(applied, added, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-13, rtol=0)
    assert not torch.equal(applied[0].detach(), make_params()[0].detach())


def test_low_rank_apply_takes_update_for_tensor_lr_and_strided_params():
    base = make_params([(6, 4), (4, 6)])
    strided = [nn.Parameter(p.detach().mT.contiguous().mT) for p in base]  # same values, column-major
    dense = make_params([(6, 4), (4, 6)])
    hp = {"rank": 2, "update_proj_gap": 2}
    tensor_lr = make_params([(6, 4), (4, 6)])
    runs = [
        (strided, create("galore", strided, lr=0.01, **hp)),
        (dense, create("galore", dense, lr=0.01, **hp)),
        (tensor_lr, create("galore", tensor_lr, lr=torch.tensor(0.01, dtype=torch.float64), **hp)),
    ]
    for params, opt in runs:
        run(opt, params, 3)
    for p, q, r in zip(*(params for params, _ in runs), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-13, rtol=0)
        torch.testing.assert_close(r.detach(), q.detach(), atol=1e-13, rtol=0)
    assert not strided[0].is_contiguous()
