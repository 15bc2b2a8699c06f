"""Ghost batch norm against BatchNorm applied to each ghost batch in turn (float64), and regime adaptation."""

import copy

import pytest
import torch
from torch import nn

from trainlab.schedules.ghost_batch_norm import GhostBatchNorm, Regime, adapt_regime, to_ghost_batch_norm_


def _pair(c, ghost, momentum=0.1, dims=1):
    torch.manual_seed(0)
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    gbn = GhostBatchNorm(c, ghost, momentum=momentum).double()
    gbn.load_state_dict(bn.state_dict())
    return bn, gbn


def _input(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).requires_grad_()


def _check_against_chunks(bn, gbn, x, ghost, steps=3):
    """GBN over x == BatchNorm on each ghost chunk in order: outputs, grads, running stats."""
    for _ in range(steps):
        xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        ref = torch.cat([bn(chunk) for chunk in xa.split(ghost)])
        out = gbn(xb)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        (ref * weights).sum().backward()
        (out * weights).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(gbn.weight.grad, bn.weight.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(gbn.bias.grad, bn.bias.grad, atol=1e-12, rtol=0)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(gbn, name), getattr(bn, name), atol=1e-12, rtol=0)


def test_ghost_as_large_as_the_batch_is_batch_norm():
    bn, gbn = _pair(5, ghost=64)
    _check_against_chunks(bn, gbn, _input((64, 5)), ghost=64)


@pytest.mark.parametrize("n", [128, 100])  # four equal ghost batches (vectorized); a ragged last one
def test_ghost_batches_are_normalized_and_tracked_one_by_one(n):
    bn, gbn = _pair(5, ghost=32)
    _check_against_chunks(bn, gbn, _input((n, 5)), ghost=32)


def test_conv_inputs_and_cumulative_average():
    bn, gbn = _pair(3, ghost=8, dims=2)
    _check_against_chunks(bn, gbn, _input((32, 3, 4, 4)), ghost=8)
    bn, gbn = _pair(4, ghost=8, momentum=None)
    _check_against_chunks(bn, gbn, _input((32, 4)), ghost=8)


def test_evaluation_uses_running_statistics_as_batch_norm():
    bn, gbn = _pair(5, ghost=16)
    gbn(_input((64, 5)))  # trains the running statistics
    bn.load_state_dict(gbn.state_dict())
    bn.eval(), gbn.eval()
    x = _input((10, 5), seed=3)
    torch.testing.assert_close(gbn(x), bn(x), atol=0, rtol=0)


def test_to_ghost_batch_norm_swaps_every_batch_norm_and_keeps_its_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(144)))
    model(torch.randn(8, 1, 8, 8))
    state = copy.deepcopy(model.state_dict())
    assert to_ghost_batch_norm_(model, 4) is model
    assert isinstance(model[1], GhostBatchNorm) and isinstance(model[2][1], GhostBatchNorm)
    assert model[1].virtual_batch_size == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_adapt_regime_keeps_the_number_of_updates():
    """ResNet-44's CIFAR-10 regime (lr 0.1, drops at epochs 81/122/164 of 182, B_S = 128) moved to 4096."""
    small = Regime(lr=0.1, epochs=182, batch_size=128, milestones=(81, 122, 164))
    large = adapt_regime(small, 4096)
    assert large.lr == pytest.approx(0.1 * 32**0.5) and large.epochs == 182 * 32 and large.batch_size == 4096
    assert large.milestones == (81 * 32, 122 * 32, 164 * 32)
    assert large.steps(50_000) == small.steps(50_000) == 71_094
    assert large.milestone_steps(50_000) == small.milestone_steps(50_000)


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: GhostBatchNorm(4, 1), "virtual_batch_size"),
        (lambda: adapt_regime(Regime(0.1, 0, 32), 64), "epochs"),
        (lambda: adapt_regime(Regime(-1.0, 10, 32), 64), "lr"),
        (lambda: adapt_regime(Regime(0.1, 10, 32, milestones=(20,)), 64), "milestones"),
        (lambda: adapt_regime(Regime(0.1, 10, 32), 0), "new_batch_size"),
    ],
)
def test_bad_arguments_name_themselves(call, word):
    with pytest.raises(ValueError, match=word):
        call()
