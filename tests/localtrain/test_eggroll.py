import math

import pytest
import torch
from torch import nn

from trainlab import localtrain
from trainlab.localtrain.eggroll import Eggroll, shape_fitness
from trainlab.memory.allocations import PeakTensorMeter


def _trainer(model, rank=3, population=8, chunk=4, sigma=0.3, loss=None):
    kw = {} if loss is None else {"loss": loss}
    return Eggroll(
        model,
        num_classes=3,
        sigma=sigma,
        lr=0.1,
        population=population,
        rank=rank,
        chunk=chunk,
        optimizer="sgd",
        seed=5,
        **kw,
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _explicit_members(trainer, chunk):
    """Per-member weights and biases built explicitly: W + s(σ/√r) A Bᵀ, b + sσε."""
    members = []
    for k in range(trainer.chunk):
        s = 1.0 if k % 2 == 0 else -1.0
        layers = []
        for i, layer in enumerate(trainer.layers):
            a, b, eb = trainer.noise(i, chunk)
            e = s * trainer.sigma / math.sqrt(trainer.rank) * a[k // 2] @ b[k // 2].T
            layers.append((layer.weight + e, layer.bias + s * trainer.sigma * eb[k // 2]))
        members.append(layers)
    return members


def test_low_rank_member_outputs_equal_the_explicit_perturbed_network():
    model = _model()
    trainer = _trainer(model)
    trainer.prepare(None)
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad(), trainer._population(1):
        out = model(x.repeat(4, 1)).view(4, 6, 3)
    for k, ((w1, b1), (w2, b2)) in enumerate(_explicit_members(trainer, 1)):
        expected = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-12)


def test_antithetic_pairs_cancel_and_noise_is_regenerated_from_its_key():
    model = nn.Linear(5, 4).double()
    trainer = _trainer(model)
    trainer.prepare(None)
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad(), trainer._population(0):
        out = model(x.repeat(4, 1)).view(2, 2, 6, 4)
    torch.testing.assert_close(out.mean(1), model(x).detach().expand(2, 6, 4), rtol=0, atol=1e-12)
    first, again = trainer.noise(0, 0), trainer.noise(0, 0)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    trainer.generation += 1
    assert not torch.equal(trainer.noise(0, 0)[0], first[0])  # every generation draws new directions
    # Equal fitness everywhere: shaped fitness is zero and so is the update.
    torch.testing.assert_close(shape_fitness(torch.ones(8, dtype=torch.float64)), torch.zeros(8, dtype=torch.float64))


def test_update_equals_the_fitness_weighted_sum_of_explicit_perturbations():
    model = _model()
    trainer = _trainer(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    trainer.prepare(x)
    losses = trainer.population_losses(x, y)
    # The same losses from the explicit member networks.
    explicit = []
    for c in range(2):
        for (w1, b1), (w2, b2) in _explicit_members(trainer, c):
            logits = torch.tanh(x @ w1.T + b1) @ w2.T + b2
            explicit.append(torch.nn.functional.cross_entropy(logits, y))
    torch.testing.assert_close(losses, torch.stack(explicit).detach(), rtol=0, atol=1e-12)
    shaped = shape_fitness(-losses)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for c in range(2):
        for k, layers in enumerate(_explicit_members(trainer, c)):
            for j, ((w, b), layer) in enumerate(zip(layers, trainer.layers, strict=True)):
                expected[2 * j] += shaped[4 * c + k] * (w - layer.weight).detach()
                expected[2 * j + 1] += shaped[4 * c + k] * (b - layer.bias).detach()
    before = [p.detach().clone() for p in model.parameters()]
    trainer.step(x, y)
    for p0, p, e in zip(before, model.parameters(), expected, strict=True):
        grad = -math.sqrt(8) / 8 * e
        torch.testing.assert_close(p.detach(), p0 - 0.1 * grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [4, 0])
def test_the_full_perturbation_is_never_materialized(rank):
    """Every tensor a low-rank generation creates is recorded: none holds a member's o×i perturbation."""
    model = nn.Linear(40, 30)
    trainer = _trainer(model, rank=rank, population=8, chunk=4)
    x, y = torch.randn(6, 40), torch.randint(0, 3, (6,))
    trainer.prepare(x)
    with PeakTensorMeter() as meter:
        trainer.step(x, y)
    # A stack of o×i matrices, one per member or pair (the aggregate update may carry a leading 1).
    dense = [s for s in meter.shapes if s[-2:] == (30, 40) and math.prod(s[:-2]) > 1]
    if rank:
        assert not dense
        assert max(math.prod(s) for s in meter.shapes) <= 30 * 40  # the update itself, never more
    else:
        assert dense  # full-rank ES does build them: the check can fail


def test_eggroll_fits_a_linear_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(8, 8) / 3
    x = torch.randn(64, 8)
    y = x @ teacher.T
    model = nn.Linear(8, 8, bias=False)

    def mse(out, target):
        return ((out - target) ** 2).mean(-1)

    trainer = _trainer(model, rank=4, population=64, chunk=32, sigma=0.05, loss=mse)
    trainer.lr = 0.2
    start = mse(model(x), y).mean().item()
    for _ in range(60):
        trainer.step(x, y)
    assert mse(model(x), y).mean().item() < 0.2 * start


def test_rejects_odd_population_and_uncovered_parameters():
    with pytest.raises(ValueError, match="population must be even"):
        _trainer(nn.Linear(2, 2), population=7)
    with pytest.raises(ValueError, match="chunk must be even and divide"):
        _trainer(nn.Linear(2, 2), population=8, chunk=6)
    with pytest.raises(ValueError, match="freeze or remove"):
        localtrain.create("eggroll", nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), num_classes=2)
