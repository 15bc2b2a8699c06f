"""Every trainlab optimizer under DDP (2 gloo processes, forked once) ends bitwise equal to one process that
averages the two ranks' gradients the way DDP does (each halved, then summed: exact for 2 ranks).

AdaHessian is left out: it needs a closure with a double backward, which DDP does not support."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from two_ranks import run_on_two_ranks

from trainlab import optim

LEFT_OUT = ("adahessian",)  # docs/distributed.md's support table is checked against this
NAMES = [n for n in optim.optimizer_names() if n not in LEFT_OUT]
STEPS = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(rank, step):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def _loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _reference(name):
    model = _model()
    params = list(model.parameters())
    opt = optim.create(name, params)
    for step in range(STEPS):
        # each rank's gradient, halved, then summed: what DDP's all-reduce computes
        grads = [torch.autograd.grad(_loss(model, _batch(r, step)), params) for r in range(2)]
        for p, g0, g1 in zip(params, *grads, strict=True):
            p.grad = g0 / 2 + g1 / 2
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def _compute(rank, tmp):
    results = {}
    for name in NAMES:
        ddp = DDP(_model())
        opt = optim.create(name, ddp.parameters())
        for step in range(STEPS):
            opt.zero_grad()
            _loss(ddp, _batch(rank, step)).backward()
            opt.step()
        results[name] = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    return results


@pytest.fixture(scope="module")
def results():
    return run_on_two_ranks(_compute)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_under_ddp_equals_one_process_bitwise(results, name):
    assert torch.equal(results[name], _reference(name))
