"""Each method's equations in float64, against formulas written from the papers (and PEFT where it has the method)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from adapter_toys import mse
from torch import nn

import trainlab.adapters as adapters
from trainlab.adapters.adalora import AdaLoRACallback, orthogonal_regularizer
from trainlab.adapters.importance import SensitivityEMA, cubic_budget
from trainlab.adapters.s2ft import co_permute_, selected_first
from trainlab.adapters.snell import keep_largest
from trainlab.adapters.welore import normalized_spectrum, pruned_ranks, threshold_for_reduction

D = torch.float64


def linear(n_in: int = 16, n_out: int = 12, seed: int = 0) -> nn.Sequential:
    """One Linear inside a Sequential (attach swaps named children, never the root)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out)).double()


def batches(n_in: int = 16, n_out: int = 12, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(20, n_in, generator=g, dtype=D), torch.randn(20, n_out, generator=g, dtype=D))
        for _ in range(count)
    ]


# -- LoRA-GA ---------------------------------------------------------------------------------------------------------
def test_lora_ga_init_is_the_gradient_svd_with_stable_scale() -> None:
    base, data, r, gamma = linear(), batches(), 3, 16.0
    grad = sum(torch.autograd.grad(mse(base, b), base[0].weight)[0] for b in data) / len(data)
    u, _, vh = torch.linalg.svd(grad)
    factor = 12**0.25 / math.sqrt(gamma)
    model = adapters.attach(base, "lora-ga", targets=[nn.Linear], r=r, stable_gamma=gamma)
    adapters.prepare(model, data, loss=mse)
    layer = model[0]
    # Sign-free comparison: the row spaces / column spaces and the scale.
    torch.testing.assert_close(layer.lora_A.T @ layer.lora_A, factor**2 * vh[:r].T @ vh[:r], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        layer.lora_B @ layer.lora_B.T, factor**2 * u[:, r : 2 * r] @ u[:, r : 2 * r].T, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(model(data[0][0]), base(data[0][0]), rtol=0, atol=1e-12)  # offset: unchanged output
    assert base[0].weight.grad is None  # prepare leaves the caller's .grad alone


def test_lora_ga_first_step_is_the_projected_full_gradient() -> None:
    """One SGD step moves W_eff by -η s² (B Bᵀ G + G AᵀA) + O(η²): the paper's gradient approximation."""
    base, data, eta = linear(), batches(), 1e-6
    model = adapters.attach(base, "lora-ga", targets=[nn.Linear], r=3)
    adapters.prepare(model, data, loss=mse)
    g_full = sum(torch.autograd.grad(mse(base, b), base[0].weight)[0] for b in data) / len(data)
    layer = model[0]
    a, b, s = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling
    w0 = layer.delta_weight(base[0].weight).detach()
    loss = sum(mse(model, batch) for batch in data) / len(data)
    loss.backward()
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p -= eta * p.grad
    moved = layer.delta_weight(base[0].weight).detach() - w0
    expected = -eta * s**2 * (b @ b.T @ g_full + g_full @ a.T @ a)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    cos = torch.nn.functional.cosine_similarity(moved.flatten(), -g_full.flatten(), dim=0)
    assert cos > 0.5  # the step points along the full-gradient descent direction


# -- AdaLoRA ---------------------------------------------------------------------------------------------------------
def test_sensitivity_uncertainty_ema_matches_the_formula() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=D))
    ema = SensitivityEMA([p], 0.85, 0.7)
    bar_i, bar_u = torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)
    for grad in ([0.5, 0.1, -1.0], [0.2, -0.4, 2.0]):
        p.grad = torch.tensor(grad, dtype=D)
        ema.update()
        current = (p * p.grad).abs().detach()
        bar_i = 0.85 * bar_i + 0.15 * current
        bar_u = 0.7 * bar_u + 0.3 * (current - bar_i).abs()
    torch.testing.assert_close(ema.sensitivity[0], bar_i)
    torch.testing.assert_close(ema.uncertainty[0], bar_u)
    torch.testing.assert_close(ema.scores()[0], bar_i * bar_u)


def test_cubic_budget_schedule() -> None:
    args = {"total_steps": 100, "initial": 40, "target": 10, "init_warmup": 10, "final_warmup": 20, "interval": 5}
    assert cubic_budget(10, **args) == (40, False)
    assert cubic_budget(15, **args) == (int(30 * (1 - 5 / 70) ** 3 + 10), True)
    assert cubic_budget(16, **args)[1] is False
    assert cubic_budget(80, **args) == (10, True)  # 1 - 70/70 = 0: the target at the start of the final phase
    assert cubic_budget(81, **args) == (10, True)


def test_adalora_masks_the_lowest_triplet_scores_and_counts_regularizer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    model = adapters.attach(net, "adalora", targets=[nn.Linear], r=4)
    cb = adapters.training_callback(
        model, total_steps=10, init_warmup=0, final_warmup=0, mask_interval=1, target_rank=2
    )
    assert isinstance(cb, AdaLoRACallback)
    layers = list(adapters.adapter_layers(model).values())
    with torch.no_grad():
        for la in layers:
            la.lora_E.normal_()
    x = torch.randn(6, 8, dtype=D)
    model(x).pow(2).mean().backward()
    cb.step(5)
    s = cb.ema.scores()
    manual = [e.view(-1) + a.mean(1) + b.mean(0) for e, a, b in zip(s[0::3], s[1::3], s[2::3], strict=True)]
    budget = int((8 - 4) * (1 - 5 / 10) ** 3 + 4)
    allscores = torch.cat(manual)
    kept = allscores > allscores.kthvalue(8 - budget).values
    assert sum(la.rank() for la in layers) == int(kept.sum()) == budget
    assert torch.equal(torch.cat([la.lora_E.view(-1) != 0 for la in layers]), kept)
    expected = (
        sum(
            torch.linalg.matrix_norm(la.lora_A @ la.lora_A.T - torch.eye(4, dtype=D))
            + torch.linalg.matrix_norm(la.lora_B.T @ la.lora_B - torch.eye(4, dtype=D))
            for la in layers
        )
        / 4
    )
    torch.testing.assert_close(orthogonal_regularizer(layers), expected)
    torch.testing.assert_close(cb.regularizer(), 0.1 * expected)


def test_adalora_delta_is_scaled_by_the_initial_rank() -> None:
    model = adapters.attach(linear(), "adalora", targets=[nn.Linear], r=4, alpha=8.0)[0]
    with torch.no_grad():
        model.lora_E.copy_(torch.tensor([[1.0], [0.0], [2.0], [0.0]], dtype=D))  # two values pruned
    expected = model.lora_B @ torch.diag(model.lora_E.view(-1)) @ model.lora_A * 8.0 / (4 + 1e-5)
    torch.testing.assert_close(model.delta_weight(model.base.weight), expected)


# -- Bone / Bat ------------------------------------------------------------------------------------------------------
def test_bone_blocks_follow_the_block_affine_formula() -> None:
    model = adapters.attach(linear(16, 8), "bone", targets=[nn.Linear], r=4)[0]
    with torch.no_grad():
        model.bone_block.normal_(std=0.3)
    w, b = model.base.weight, model.bone_block
    delta = model.delta_weight(w)
    for i in range(2):
        for j in range(4):
            block = w[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            torch.testing.assert_close(delta[4 * i : 4 * i + 4, 4 * j : 4 * j + 4], block @ b[i] + b[i])


def test_bone_matches_peft_miss_bat() -> None:
    peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install trainlab[test]")
    base = linear(16, 8)
    ours = adapters.attach(base, "bone", targets=[nn.Linear], r=4)
    theirs = peft.get_peft_model(base, peft.MissConfig(r=4, init_weights="bat", target_modules=["0"]))
    with torch.no_grad():
        ours[0].bone_block.normal_(std=0.3)
        theirs.base_model.model[0].miss_block["default"].copy_(ours[0].bone_block)
    x = torch.randn(5, 16, dtype=D)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-12)
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(merged(x), ours(x), rtol=0, atol=1e-12)


# -- HUT -------------------------------------------------------------------------------------------------------------
def test_hut_is_a_hadamard_transformation_of_the_weight() -> None:
    model = adapters.attach(linear(), "hut", targets=[nn.Linear], r=2)[0]
    with torch.no_grad():
        model.hut_V.normal_()
    w = model.base.weight
    torch.testing.assert_close(w + model.delta_weight(w), w * (1 + model.hut_U @ model.hut_V.T))
    assert torch.linalg.matrix_rank(model.delta_weight(w)) > 2  # beyond LoRA's rank at the same parameter count


# -- S2FT ------------------------------------------------------------------------------------------------------------
def test_co_permutation_preserves_the_function_and_makes_the_selection_contiguous() -> None:
    torch.manual_seed(0)
    up, down = nn.Linear(8, 32).double(), nn.Linear(32, 8).double()
    x = torch.randn(4, 8, dtype=D)
    y = down(torch.relu(up(x)))
    index = torch.tensor([3, 7, 20, 30])
    order = selected_first(index, 32)
    selected_rows = up.weight[index].clone()
    co_permute_(up, down, order)
    torch.testing.assert_close(down(torch.relu(up(x))), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(up.weight[:4], selected_rows)  # the selected channels are now rows 0..3
    with pytest.raises(ValueError, match="permutation"):
        co_permute_(up, down, torch.zeros(32, dtype=torch.long))


@pytest.mark.parametrize("side", ["rows", "columns"])
def test_s2ft_touches_only_the_selected_rows_or_columns(side: str) -> None:
    model = adapters.attach(linear(), "s2ft", targets=[nn.Linear], ratio=0.25, side=side)[0]
    with torch.no_grad():
        model.s2.normal_()
    delta = model.delta_weight(model.base.weight)
    axis = 0 if side == "rows" else 1
    touched = (delta != 0).any(dim=1 - axis).nonzero().flatten()
    assert torch.equal(touched, model.index) and len(model.index) == (3 if side == "rows" else 4)


# -- SaRA ------------------------------------------------------------------------------------------------------------
def test_sara_trains_the_smallest_weights_under_a_nuclear_penalty_and_freezes_grown_ones() -> None:
    net = linear(16, 12)
    base = net[0]
    adapted_net = adapters.attach(net, "sara", targets=[nn.Linear], threshold=0.15)
    model = adapted_net[0]
    small = (base.weight.abs() < 0.15).flatten().nonzero().flatten()
    assert torch.equal(model.index, small)
    cb = adapters.training_callback(adapted_net, progressive_iter=1, min_dim=0, lambda_rank=0.5)
    with torch.no_grad():
        model.sara_values.copy_(torch.linspace(-0.1, 0.1, len(small), dtype=D))
    masked = torch.zeros(16 * 12, dtype=D)
    masked[small] = base.weight.flatten()[small] + model.sara_values
    assert len(small) > 100  # the official code regularizes only layers with over 100 trainable entries
    torch.testing.assert_close(cb.regularizer(), 0.5 * torch.linalg.matrix_norm(masked.view(12, 16), "nuc"))
    torch.testing.assert_close(model.masked_weight(), masked.view(12, 16))
    opt = torch.optim.SGD([model.sara_values], lr=0.5)
    g = torch.Generator().manual_seed(0)
    history = []
    for step in (1, 2, 3):
        opt.zero_grad()
        batch = (torch.randn(8, 16, generator=g, dtype=D), torch.randn(8, 12, generator=g, dtype=D))
        mse(model, batch).backward()
        opt.step()
        cb.step(step)
        history.append(model.sara_values.detach().clone())
    grown = (base.weight.flatten()[small] + history[0]).abs() >= 0.15  # decided at progressive_iter = 1
    assert grown.any() and (~grown).any()
    assert torch.equal(history[2][grown], history[0][grown])  # frozen from then on
    assert not torch.equal(history[2][~grown], history[0][~grown])  # the rest keeps training


# -- SNELL -----------------------------------------------------------------------------------------------------------
def test_snell_kernel_merge_and_top_k_sparsity() -> None:
    model = adapters.attach(linear(6, 5), "snell", targets=[nn.Linear], r=4, heads=2, sparsity=0.6)[0]
    manual = torch.zeros(5, 6, dtype=D)
    for h, c in enumerate((0.1, -0.1)):
        for o in range(5):
            for i in range(6):
                manual[o, i] += c * torch.linalg.vector_norm(model.in_q[h, i] - model.out_q[h, o])
    torch.testing.assert_close(model.dense_delta(), manual)
    sparse = model.delta_weight(model.base.weight)
    assert int((sparse != 0).sum()) == 30 - int(0.6 * 30)
    kept = sparse != 0
    assert manual.abs()[kept].min() >= manual.abs()[~kept].max()
    assert torch.linalg.matrix_rank(manual) == 5  # full rank from a rank-4 parameterization
    torch.testing.assert_close(keep_largest(manual, 0.0), manual)


def test_snell_branch_goes_through_drop_path_in_training_only() -> None:
    model = adapters.attach(linear(6, 5), "snell", targets=[nn.Linear], r=4, sparsity=0.5)[0]
    assert model.drop_path == 0.1  # the official TuningModule's DropPath(0.1)
    x = torch.randn(400, 6, dtype=D)
    w = model.base.weight
    base, branch = model.base(x), x @ model.delta_weight(w).T
    torch.manual_seed(5)
    y = model(x)  # training mode: each sample's branch is dropped or scaled by 1/0.9
    torch.manual_seed(5)
    keep = torch.empty(400, 1, dtype=D).bernoulli_(0.9)
    torch.testing.assert_close(y, base + branch * keep / 0.9)
    assert 0 < int((keep == 0).sum()) < 80
    model.eval()
    torch.testing.assert_close(model(x), base + branch)  # eval: deterministic, equal to the merged layer
    adapters.merge(model)
    torch.testing.assert_close(model(x), base + branch)


def test_snella_learnable_kernel_term() -> None:
    model = adapters.attach(linear(6, 5), "snell", targets=[nn.Linear], r=4, sparsity=0.0, learnable_kernel=True)[0]
    with torch.no_grad():
        model.kernel_alpha.fill_(0.7), model.kernel_gamma.fill_(0.5), model.kernel_beta.fill_(-0.02)
    plain = torch.einsum("h,hoi->oi", model.coefficients, torch.cdist(model.out_q, model.in_q))
    manual = plain + 0.7 * torch.exp(plain / 0.5) / torch.exp(plain / 0.5).sum(0, keepdim=True) - 0.02
    torch.testing.assert_close(model.delta_weight(model.base.weight), manual)
    assert (
        adapters.count_trainable(
            adapters.attach(linear(6, 5), "snell", targets=[nn.Linear], r=4, learnable_kernel=True)
        )
        == 4 * 11 + 3
    )


def test_snell_allocation_shares_the_budget_by_score_with_caps() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    model = adapters.attach(net, "snell", targets=[nn.Linear], r=2, sparsity=0.5)
    cb = adapters.training_callback(model, total_steps=10, target_ratio=0.2)
    ema = cb.ema
    ema.sensitivity = [torch.full_like(t, v) for t, v in zip(ema.sensitivity, (3.0, 3.0, 1.0, 1.0), strict=True)]
    ema.uncertainty = [torch.ones_like(t) for t in ema.uncertainty]
    volume = cb.allocate(60)
    torch.testing.assert_close(volume, torch.tensor([45.0, 15.0], dtype=D))  # 3:1 by score
    volume = cb.allocate(90)  # 67.5 > 64 for layer 0: capped, the excess goes to layer 1
    torch.testing.assert_close(volume, torch.tensor([64.0, 26.0], dtype=D))


# -- WeLore ----------------------------------------------------------------------------------------------------------
def _with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(values)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q1 @ torch.diag(values) @ q2.T


def test_welore_global_threshold_gives_non_uniform_ranks() -> None:
    fast = _with_spectrum(0.5 ** torch.arange(16, dtype=D), 0)
    flat = _with_spectrum(torch.linspace(1.0, 0.5, 16, dtype=D), 1)
    spectra = {"fast": normalized_spectrum(fast), "flat": normalized_spectrum(flat)}
    expected_fast = (0.5 ** torch.arange(16, dtype=D) - 0.5**15) / (1 - 0.5**15)
    torch.testing.assert_close(spectra["fast"], expected_fast)
    assert pruned_ranks(spectra, 0.3) == {
        "fast": int((expected_fast < 0.3).sum()),
        "flat": int((torch.linspace(1.0, 0.0, 16, dtype=D) < 0.3).sum()),
    }
    theta = threshold_for_reduction(spectra, 0.5)
    ranks = pruned_ranks(spectra, theta)
    assert sum(ranks.values()) == 16 and ranks["fast"] > ranks["flat"]


def test_welore_factors_are_the_truncated_svd() -> None:
    net = nn.Sequential(nn.Linear(16, 16, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(_with_spectrum(0.5 ** torch.arange(16, dtype=D), 2))
    model = adapters.attach(net, "welore", targets=[nn.Linear], threshold=0.01)
    k = model[0].welore_U.shape[1]
    u, s, vh = torch.linalg.svd(net[0].weight)
    assert k == 16 - int(((s - s.min()) / (s.max() - s.min()) < 0.01).sum())
    torch.testing.assert_close(model[0].welore_U @ model[0].welore_V, u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    assert not hasattr(model[0].base, "weight")  # the dense weight is gone


def test_adalora_rank_pruning_matches_peft() -> None:
    peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install trainlab[test]")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    ours = adapters.attach(net, "adalora", targets=[nn.Linear], r=4, alpha=4.0)
    cb = adapters.training_callback(ours, total_steps=10, init_warmup=1, final_warmup=2, mask_interval=1, target_rank=1)
    config = peft.AdaLoraConfig(
        init_r=4,
        target_r=1,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=10,
        lora_alpha=4,
        target_modules=["0", "2"],
        beta1=0.85,
        beta2=0.85,
    )
    theirs = peft.get_peft_model(copy.deepcopy(net), config)
    pairs = []
    with torch.no_grad():
        for name in ("0", "2"):
            mine, other = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            mine.lora_E.normal_()
            for key in ("lora_A", "lora_E", "lora_B"):
                other.get_parameter(f"{key}.default").copy_(getattr(mine, key))
                pairs.append((getattr(mine, key), other.get_parameter(f"{key}.default")))
    g = torch.Generator().manual_seed(0)
    for step in range(1, 8):  # warmup, cubic phase (masking every step)
        x = torch.randn(16, 8, generator=g, dtype=D)
        for model in (ours, theirs):
            model.zero_grad()
            model(x).pow(2).mean().backward()
        with torch.no_grad():
            for p, q in pairs:
                p -= 0.05 * p.grad
                q -= 0.05 * q.grad
        cb.step(step)
        theirs.base_model.update_and_allocate(step)
        for p, q in pairs:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert sum(la.rank() for la in adapters.adapter_layers(ours).values()) < 8  # something was pruned


def test_snell_callback_sets_each_layers_kept_share_from_the_budget() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    model = adapters.attach(net, "snell", targets=[nn.Linear], r=2, sparsity=0.5)
    cb = adapters.training_callback(model, total_steps=4, target_ratio=0.25)
    model(torch.randn(5, 8, dtype=D)).pow(2).mean().backward()
    cb.step(4)  # the last step: the full target budget, 75% of 96 entries kept
    layers = list(adapters.adapter_layers(model).values())
    kept = [round((1 - la.kept_sparsity) * la.in_features * la.out_features) for la in layers]
    assert sum(kept) == 72
    for la, k in zip(layers, kept, strict=True):
        assert float(la.sparsity) == pytest.approx(la.kept_sparsity)
        assert int((la.delta_weight(la.base.weight) != 0).sum()) == pytest.approx(k, abs=1)
