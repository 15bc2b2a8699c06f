"""MKOR preconditions Hugging Face GPT-2 ``Conv1D`` layers (weight stored ``(in, out)``) like nn.Linear."""

import pytest
import torch
from torch import nn

from trainlab.optim import create

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def test_mkor_preconditions_every_conv1d_of_a_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    model = GPT2LMHeadModel(config)
    opt = create("mkor", model.parameters(), lr=0.01, inv_freq=1)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the first refresh resets the factors to the identity (mkor.py), the second moves them
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    conv1d = [m.weight for m in model.modules() if isinstance(m, Conv1D)]
    observed = opt.observer.layers
    assert len(conv1d) == 8 and all(id(w) in observed for w in conv1d)
    assert len(observed) == 9  # the 8 Conv1D and the (tied) lm_head
    for w in conv1d:  # factors sized (out, in + bias) of the (out, in) matrix, refreshed away from the identity
        state = opt.state[w]
        left = next(v for k, v in state.items() if k.endswith("left_inv"))
        right = next(v for k, v in state.items() if k.endswith("right_inv"))
        assert left.shape == (w.shape[0] + 1,) * 2 and right.shape == (w.shape[1],) * 2
        assert not torch.equal(right, torch.eye(w.shape[1], dtype=w.dtype))


def test_conv1d_step_equals_the_transposed_linear_step():
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(3, 6)).double()
    lin = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for c, linear in ((conv[0], lin[0]), (conv[2], lin[2])):
            linear.weight.copy_(c.weight.t())
            linear.bias.copy_(c.bias)
    opts = [create("mkor", m.parameters(), lr=0.1, momentum=0.9, inv_freq=1) for m in (conv, lin)]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(7, 4, 5, generator=g, dtype=torch.float64), torch.randn(7, 4, 3, generator=g).double()
        for model, opt in zip((conv, lin), opts, strict=True):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    start = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(3, 6)).double()  # a step moved the weights
    assert not torch.allclose(conv[0].weight, start[0].weight)
    for c, linear in ((conv[0], lin[0]), (conv[2], lin[2])):
        assert torch.allclose(c.weight.t(), linear.weight, rtol=0, atol=1e-12)
        assert torch.allclose(c.bias, linear.bias, rtol=0, atol=1e-12)
