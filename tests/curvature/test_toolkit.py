"""The curvature toolkit against exact Hessians: explicit matrices, eigvalsh, linear solves (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainlab.curvature import (
    FisherWindow,
    LayerObserver,
    hutchinson_diagonal,
    hutchinson_trace,
    hvp,
    rademacher_like,
    sherman_morrison,
    top_eigenvalues,
)

torch.set_num_threads(1)
DTYPE = torch.float64


def quadratic(a: torch.Tensor) -> tuple[callable, list[torch.Tensor]]:
    """``loss = ½ xᵀAx + bᵀx`` (Hessian exactly A) at a random x, as (loss_fn, params)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(a.shape[0], generator=gen, dtype=DTYPE, requires_grad=True)
    b = torch.randn(a.shape[0], generator=gen, dtype=DTYPE)
    return (lambda: 0.5 * x @ a @ x + b @ x), [x]


def diagonal_heavy_matrix(d: int = 20) -> torch.Tensor:
    """Diagonal in [1, 5] plus small off-diagonal terms with a positive mean (row sums ≠ diagonal)."""
    gen = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(d, d, generator=gen, dtype=DTYPE) + 0.05
    off = (noise + noise.T) / 2
    off.fill_diagonal_(0)
    return torch.diag(torch.linspace(1, 5, d, dtype=DTYPE)) + off


def matrix_with_spectrum(values: list[float]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=DTYPE))
    return q @ torch.diag(torch.tensor(values, dtype=DTYPE)) @ q.T


# ---- Hessian-vector products ----


def test_hvp_equals_explicit_hessian_times_vector():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (16,), generator=gen)
    w = torch.randn(3, 4, generator=gen, dtype=DTYPE, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=DTYPE, requires_grad=True)

    def loss_of(w_, b_):
        return F.cross_entropy(torch.tanh(x @ w_.T + b_) * 2.0, y)

    v = [torch.randn(3, 4, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)]
    ours = hvp(lambda: loss_of(w, b), [w, b], v)
    h = torch.autograd.functional.hessian(
        lambda f: loss_of(f[:12].reshape(3, 4), f[12:]), torch.cat([w.detach().reshape(-1), b.detach()])
    )
    expected = h @ torch.cat([v[0].reshape(-1), v[1]])
    got = torch.cat([ours[0].reshape(-1), ours[1]])
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert w.grad is None  # no .grad side effects


def test_hvp_rejects_mismatched_vectors():
    loss_fn, params = quadratic(torch.eye(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="one tensor per parameter"):
        hvp(loss_fn, params, [])
    with pytest.raises(ValueError, match="does not match"):
        hvp(loss_fn, params, [torch.zeros(4, dtype=DTYPE)])


# ---- Rademacher probes ----


def test_rademacher_probes_are_plus_minus_one_with_mean_zero():
    z = rademacher_like([torch.empty(200_000, dtype=DTYPE)], torch.Generator().manual_seed(0))[0]
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 4 / 200_000**0.5  # 4 standard errors
    assert (z * z).mean().item() == 1.0


# ---- Hutchinson diagonal and trace ----


def test_hutchinson_diagonal_converges_to_true_diagonal():
    a = diagonal_heavy_matrix()
    loss_fn, params = quadratic(a)
    errors = []
    for samples in (10, 100, 1000):
        est = hutchinson_diagonal(loss_fn, params, samples=samples, generator=torch.Generator().manual_seed(3))[0]
        errors.append(((est - a.diagonal()).abs() / a.diagonal()).max().item())
    assert errors[2] < 0.05, errors
    assert errors[0] > errors[1] > errors[2], errors  # converges (error ~ 1/sqrt(samples))


def test_all_minus_one_probe_is_biased():
    """The buggy port's probe z = −1 measures ``z ⊙ Hz = H·1`` (row sums), not the diagonal."""
    a = diagonal_heavy_matrix()
    loss_fn, params = quadratic(a)
    ones = -torch.ones(a.shape[0], dtype=DTYPE)
    biased = ones * hvp(loss_fn, params, [ones])[0]
    assert torch.allclose(biased, a.sum(1))
    assert ((biased - a.diagonal()).abs() / a.diagonal()).max().item() > 0.2


def test_hutchinson_trace_converges_to_trace():
    a = diagonal_heavy_matrix()
    loss_fn, params = quadratic(a)
    est = hutchinson_trace(loss_fn, params, samples=1000, generator=torch.Generator().manual_seed(4))
    assert abs(est.item() - a.trace().item()) / a.trace().item() < 0.01


def test_hutchinson_rejects_bad_sample_count():
    loss_fn, params = quadratic(torch.eye(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="samples"):
        hutchinson_diagonal(loss_fn, params, samples=0)


# ---- top eigenvalues ----


def test_top_eigenvalues_with_deflation_match_eigvalsh():
    spectrum = [10.0, -7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    a = matrix_with_spectrum(spectrum)
    loss_fn, params = quadratic(a)
    values, vectors = top_eigenvalues(
        loss_fn, params, k=3, iters=500, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    exact = torch.linalg.eigvalsh(a)
    top3 = exact[exact.abs().argsort(descending=True)][:3]
    assert torch.allclose(values, top3, rtol=1e-8), (values, top3)
    for value, v in zip(values, vectors, strict=True):  # eigenvectors: A v = λ v
        assert torch.allclose(a @ v[0], value * v[0], atol=1e-6)


# ---- Woodbury inverse of the empirical Fisher ----


@pytest.mark.parametrize("added", [20, 32, 45])  # partly filled, exactly full, wrapped around
def test_woodbury_ihvp_equals_direct_solve(added):
    d, m, damping = 300, 32, 1e-3
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(added, d, generator=gen, dtype=DTYPE)
    window = FisherWindow(d, m, damping, dtype=DTYPE)
    for g in grads:
        window.add(g)
    rows = torch.zeros(m, d, dtype=DTYPE)
    for i in range(added):  # ring buffer: row i % m holds the latest gradient written there
        rows[i % m] = grads[i]
    v = torch.randn(d, generator=gen, dtype=DTYPE)
    expected = torch.linalg.solve(damping * torch.eye(d, dtype=DTYPE) + rows.T @ rows / m, v)
    got = window.ihvp(v)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-10


def test_fisher_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        FisherWindow(10, 0, 1e-3)
    with pytest.raises(ValueError, match="damping"):
        FisherWindow(10, 4, 0.0)


# ---- Sherman-Morrison and the layer observer (MKOR) ----


def test_sherman_morrison_equals_direct_inverse():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=DTYPE)
    p = torch.linalg.inv(m @ m.T + torch.eye(6, dtype=DTYPE))
    v = torch.randn(6, generator=gen, dtype=DTYPE)
    expected = torch.linalg.inv(torch.linalg.inv(p) + torch.outer(v, v))
    assert torch.allclose(sherman_morrison(p, v), expected, rtol=1e-12, atol=1e-12)


def test_layer_observer_records_batch_mean_vectors():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    observer = LayerObserver(clipping=100.0)
    observer.watch([lin.weight, conv.weight])
    x = torch.randn(7, 5, dtype=DTYPE)
    img = torch.randn(7, 2, 6, 6, dtype=DTYPE)
    out_lin, out_conv = lin(x), conv(img)
    g_lin = torch.randn_like(out_lin)
    g_conv = torch.randn_like(out_conv)
    (out_lin * g_lin).sum().backward()
    (out_conv * g_conv).sum().backward()
    s = observer.layers[id(lin.weight)]
    assert torch.allclose(s.inputs, torch.cat([x.mean(0), torch.ones(1, dtype=DTYPE)]))
    assert torch.allclose(s.output_grads, 7 * g_lin.mean(0))  # n·ḡ undoes a mean loss
    c = observer.layers[id(conv.weight)]
    patches = F.unfold(img, 3, padding=1).mean(-1).mean(0)
    assert torch.allclose(c.inputs, torch.cat([patches, torch.ones(1, dtype=DTYPE)]))
    assert torch.allclose(c.output_grads, 7 * g_conv.mean(dim=(2, 3)).mean(0))
    with torch.no_grad():  # evaluation does not overwrite the training statistics
        lin(torch.zeros(2, 5, dtype=DTYPE))
    assert torch.allclose(s.inputs[:-1], x.mean(0))


def test_layer_observer_hook_goes_with_the_observer():
    import gc

    hooks = nn.modules.module._global_forward_hooks
    before = len(hooks)
    observer = LayerObserver()
    assert len(hooks) == before + 1
    del observer
    gc.collect()
    assert len(hooks) == before


def test_hvp_through_fused_attention():
    """torch's fused CPU attention has no double backward; hvp selects the math kernel itself."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 8, 4, generator=gen)
    w = torch.randn(4, 4, generator=gen, requires_grad=True)

    def loss_of(w_):
        q = x @ w_
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).square().sum()

    v = torch.randn(4, 4, generator=gen)
    got = hvp(lambda: loss_of(w), [w], [v])[0]
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        h = torch.autograd.functional.hessian(lambda f: loss_of(f.reshape(4, 4)), w.detach().reshape(-1))
    expected = h @ v.reshape(-1)
    assert ((got.reshape(-1) - expected).norm() / expected.norm()).item() < 1e-4  # float32 rounding
