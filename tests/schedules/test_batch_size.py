"""AdAdaGrad's batch-size tests against float64 references written from the paper's equations."""

import math

import pytest
import torch
from torch import nn

from trainlab.schedules.batch_size import (
    AdaptiveBatchSize,
    micro_batch_gradients,
    per_sample_gradients,
    proposed_batch_size,
)


def _per_sample(k=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Two "parameters", with a shared mean direction so that the tests are finite and distinct.
    mean = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    return [m + 0.7 * torch.randn(k, *m.shape, generator=gen, dtype=torch.float64) for m in mean]


def _reference(grads, eta, theta, nu):
    """Plain loops over samples and coordinates on the whole flattened vector."""
    k = grads[0].shape[0]
    g = [torch.cat([t[i].reshape(-1) for t in grads]) for i in range(k)]
    mean = sum(g) / k
    sq = float(mean @ mean)

    def var(xs):  # sample variance (ddof 1) of a list of floats
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    coord_var = sum(var([float(gi[d]) for gi in g]) for d in range(mean.numel()))
    inner = [float(gi @ mean) for gi in g]
    ortho = [gi - (float(gi @ mean) / sq) * mean for gi in g]
    ortho_var = sum(var([float(o[d]) for o in ortho]) for d in range(mean.numel()))
    ip = var(inner) / (theta**2 * sq**2)
    return {"norm": coord_var / (eta**2 * sq), "inner_product": ip, "augmented": max(ip, ortho_var / (nu**2 * sq))}


@pytest.mark.parametrize("test", ["norm", "inner_product", "augmented"])
def test_tests_match_the_papers_equations(test):
    grads = _per_sample()
    ref = _reference(grads, eta=0.3, theta=0.5, nu=0.8)
    got = proposed_batch_size(grads, test, eta=0.3, theta=0.5, nu=0.8)
    assert got == pytest.approx(ref[test], rel=1e-12)


def test_augmented_orthogonality_term_can_dominate():
    """Noise orthogonal to the mean gradient: the inner-product test sees none of it, the augmented one does."""
    gen = torch.Generator().manual_seed(1)
    mean = torch.zeros(6, dtype=torch.float64)
    mean[0] = 1.0
    noise = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    noise[:, 0] = 0.0
    noise -= noise.mean(0)
    grads = [mean + noise]
    assert proposed_batch_size(grads, "inner_product") == pytest.approx(0.0, abs=1e-20)
    assert proposed_batch_size(grads, "augmented") == pytest.approx(float(noise.var(0).sum()), rel=1e-12)


def test_zero_mean_gradient_asks_for_the_maximum():
    grads = [torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)]
    assert math.isinf(proposed_batch_size(grads, "norm"))
    controller = AdaptiveBatchSize(4, 100)
    assert controller.update(grads) == 100


def test_micro_batch_variance_is_scaled_to_per_sample():
    """Means of micro-batches of s samples have 1/s of the variance: s · Var_j estimates Var_i."""
    grads = _per_sample(k=4000, seed=2)
    micro = [t.reshape(1000, 4, *t.shape[1:]).mean(1) for t in grads]
    per_sample = proposed_batch_size(grads, "augmented")
    assert proposed_batch_size(micro, "augmented", samples_per_row=4) == pytest.approx(per_sample, rel=0.15)


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
    return model, batch


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_per_sample_and_micro_batch_gradients_equal_one_backward_per_piece():
    model, batch = _model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    fast = per_sample_gradients(model, _loss, batch)
    micro, loss = micro_batch_gradients(model, _loss, batch, 2)
    for i in range(8):
        model.zero_grad()
        _loss(model, (batch[0][i : i + 1], batch[1][i : i + 1])).backward()
        for f, p in zip(fast, model.parameters(), strict=True):
            torch.testing.assert_close(f[i], p.grad, atol=1e-12, rtol=0)
    for j, m in enumerate(zip(*micro, strict=True)):
        for mj, f in zip(m, fast, strict=True):
            torch.testing.assert_close(mj, f[2 * j : 2 * j + 2].mean(0), atol=1e-12, rtol=0)
    assert loss.item() == pytest.approx(_loss(model, batch).item(), rel=1e-12)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_backward_fills_the_mean_gradient_and_only_grows(micro_batch):
    model, batch = _model_and_batch()
    controller = AdaptiveBatchSize(4, 64, eta=0.5, micro_batch=micro_batch)
    loss = controller.backward(model, _loss, batch)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = _loss(model, batch)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-12, rtol=0)
    sizes = [controller.batch_size]
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        model.zero_grad()
        controller.backward(model, _loss, (torch.randn(8, 5, generator=gen, dtype=torch.float64), batch[1]))
        sizes.append(controller.batch_size)
    assert sizes == sorted(sizes) and sizes[-1] <= 64
    if micro_batch:
        assert all(s % micro_batch == 0 for s in sizes)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"initial": 1, "maximum": 10}, "initial"),
        ({"initial": 8, "maximum": 4}, "maximum"),
        ({"initial": 8, "maximum": 64, "test": "variance"}, "test"),
        ({"initial": 8, "maximum": 64, "eta": 0}, "eta"),
        ({"initial": 8, "maximum": 64, "micro_batch": 8}, "micro_batch"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, word):
    with pytest.raises(ValueError, match=word):
        AdaptiveBatchSize(**kwargs)
