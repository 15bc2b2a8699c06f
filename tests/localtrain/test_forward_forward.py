import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainlab import localtrain
from trainlab.localtrain.forward_forward import embed_labels, ff_loss, goodness, length_normalize


def test_goodness_and_loss_match_the_equations():
    torch.manual_seed(0)
    h = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(goodness(h), (h**2).sum(1), rtol=0, atol=0)
    g_pos, g_neg, theta = torch.rand(6, dtype=torch.float64) * 4, torch.rand(6, dtype=torch.float64) * 4, 2.0
    expected = torch.log1p(torch.exp(-(g_pos - theta))).mean() + torch.log1p(torch.exp(g_neg - theta)).mean()
    torch.testing.assert_close(ff_loss(g_pos, g_neg, theta), expected, rtol=1e-14, atol=0)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(length_normalize(x).norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_label_embedding_overwrites_or_appends():
    x = torch.arange(12.0).view(2, 6)
    y = torch.tensor([2, 0])
    over = embed_labels(x, y, 3, "overwrite")
    torch.testing.assert_close(over, torch.tensor([[0, 0, 1, 3, 4, 5], [1, 0, 0, 9, 10, 11]], dtype=x.dtype))
    appended = embed_labels(x, y, 3, "append")
    torch.testing.assert_close(appended[:, :6], x)
    torch.testing.assert_close(appended[:, 6:], F.one_hot(y, 3).float())
    with pytest.raises(ValueError, match="more than 3 input features"):
        embed_labels(torch.zeros(2, 3), y, 3, "overwrite")


def _model():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_each_layer_gradient_is_its_own_ff_loss_on_normalized_detached_input():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="classifier head"):
        trainer = localtrain.create("forward-forward", _model().double(), num_classes=3, threshold=1.5)
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    w = [(b.block[0].weight.detach().clone(), b.block[0].bias.detach().clone()) for b in trainer.blocks]
    generator_state = trainer.generator.get_state()
    trainer.step(x, y)
    trainer.generator.set_state(generator_state)
    neg = trainer.negative_labels(y)
    assert (neg != y).all()
    a = torch.cat([embed_labels(x, y, 3, "overwrite"), embed_labels(x, neg, 3, "overwrite")])
    for i, (weight, bias) in enumerate(w):
        weight, bias = weight.requires_grad_(), bias.requires_grad_()
        xn = a / (a.norm(dim=1, keepdim=True) + 1e-8)
        h = torch.relu(xn @ weight.T + bias)
        g = (h**2).sum(1)
        loss = F.softplus(1.5 - g[:4]).mean() + F.softplus(g[4:] - 1.5).mean()
        grads = torch.autograd.grad(loss, [weight, bias])
        torch.testing.assert_close(trainer.blocks[i].block[0].weight.grad, grads[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(trainer.blocks[i].block[0].bias.grad, grads[1], rtol=0, atol=1e-12)
        a = h.detach()


def test_prediction_is_the_label_with_most_goodness_above_the_first_layer():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = localtrain.create("forward-forward", _model().double(), num_classes=3)
    x = torch.randn(5, 8, dtype=torch.float64)
    scores = trainer.predictor(x)
    for c in range(3):
        h = embed_labels(x, torch.full((5,), c), 3, "overwrite")
        h = trainer.blocks[0](h)
        torch.testing.assert_close(scores[:, c], goodness(trainer.blocks[1](h)), rtol=1e-12, atol=0)


def test_forward_forward_learns_digits(digits, batches, accuracy):
    x, y, xv, yv = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    trainer = localtrain.create("forward-forward", model, num_classes=10, lr=3e-3)
    for xb, yb in batches(x, y, 200):
        trainer.step(xb, yb)
    assert accuracy(trainer.predictor, xv, yv) > 0.5  # chance is 0.1
