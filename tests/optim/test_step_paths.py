"""The CPU step runs per-parameter chains on cache-sized slices of the parameter list, and transforms may
overwrite `Scratch` buffers of the transform before them: neither may change a single bit of the result,
and neither may write into the user's `.grad` tensors."""

import pytest
import torch
from torch import nn

from trainlab.optim import create, optimizer_names
from trainlab.optim import optimizer as optimizer_module

RECIPES = [n for n in optimizer_names() if not n.startswith("torch-")]
NEEDS_CLOSURE = {"adahessian"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Tensors of several sizes, so that slicing groups small tensors and isolates large ones.
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 4))


def _trajectory(name: str, bucket_bytes: int, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    monkeypatch.setattr(optimizer_module, "CPU_BUCKET_BYTES", bucket_bytes)
    model = _model()
    opt = create(name, model.named_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(32, 16, generator=gen) * (30.0 if step == 3 else 1.0)  # one gradient spike
        y = torch.randn(32, 4, generator=gen)

        def closure(x=x, y=y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward(create_graph=name in NEEDS_CLOSURE)
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", RECIPES)
def test_sliced_cpu_step_is_bitwise_the_whole_list_step(name, monkeypatch):
    whole = _trajectory(name, 1 << 40, monkeypatch)
    sliced = _trajectory(name, 0, monkeypatch)  # every tensor its own slice
    paired = _trajectory(name, 48 * 16 * 4 + 1, monkeypatch)  # small tensors gathered, the 48x16 weight alone
    for w, s, p in zip(whole, sliced, paired, strict=True):
        assert torch.equal(w, s) and torch.equal(w, p)


@pytest.mark.parametrize("name", sorted(set(RECIPES) - NEEDS_CLOSURE))
def test_step_never_writes_into_the_users_gradients(name):
    model = _model()
    opt = create(name, model.named_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        opt.zero_grad()
        x = torch.randn(32, 16, generator=gen) * (100.0 if step == 3 else 1.0)
        model(x).square().mean().backward()  # a real backward: MKOR also reads the layers' activations
        saved = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for before, p in zip(saved, model.parameters(), strict=True):
            assert torch.equal(before, p.grad)
