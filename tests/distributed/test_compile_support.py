"""trainlab optimizers on a torch.compile'd model (backend aot_eager: the graph capture and autograd of
torch.compile without code generation): every optimizer ends bitwise equal to the uncompiled run, except
AdaHessian (aot_autograd has no double backward) and MKOR (compiled models skip the global module hook it
observes layers with), which fail with errors saying so."""

import pytest
import torch
from torch import nn

from trainlab import optim

FAILS = {
    "adahessian": "double backward",
    "mkor": "torch.compile",
}
NAMES = optim.optimizer_names()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _run(name, compiled):
    model = _model()
    opt = optim.create(name, model.parameters())
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(forward(x), y)
            loss.backward(create_graph=name == "adahessian")
            return loss

        opt.step(closure) if name == "adahessian" else (closure(), opt.step())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")  # MKOR's
@pytest.mark.parametrize("name", NAMES)
def test_optimizer_on_compiled_model(name):
    if name in FAILS:
        with pytest.raises(RuntimeError, match=FAILS[name]):
            _run(name, compiled=True)
    else:
        assert torch.equal(_run(name, compiled=True), _run(name, compiled=False))
