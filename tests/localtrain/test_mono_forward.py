import copy

import torch
import torch.nn.functional as F
from torch import nn

from trainlab import localtrain
from trainlab.localtrain.mono_forward import MonoForward


def test_local_cross_entropy_gradients_match_the_equations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    trainer = MonoForward(model, num_classes=3, lr=1e-3, weight_decay=0.0)
    trainer.prepare(x)
    projections = [copy.deepcopy(p) for p in trainer.projections]
    assert isinstance(projections[-1], nn.Identity)  # the head's output already scores the classes
    ref = copy.deepcopy(model)
    trainer.step(x, y)
    a = x
    for i, (w_index, m) in enumerate(zip((0, 2, 4), projections, strict=True)):
        w, b = ref[w_index].weight.detach().requires_grad_(), ref[w_index].bias.detach().requires_grad_()
        z = a @ w.T + b
        act = torch.relu(z) if i < 2 else z
        mw = None if isinstance(m, nn.Identity) else m.weight.detach().requires_grad_()
        g = act if mw is None else act @ mw.T
        wrt = [w, b] + ([] if mw is None else [mw])
        grads = torch.autograd.grad(F.cross_entropy(g, y), wrt)
        torch.testing.assert_close(model[w_index].weight.grad, grads[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(model[w_index].bias.grad, grads[1], rtol=0, atol=1e-12)
        if len(grads) == 3:
            torch.testing.assert_close(trainer.projections[i].weight.grad, grads[2], rtol=0, atol=1e-12)
        a = act.detach()


def test_a_model_without_a_class_sized_head_predicts_through_its_last_projection():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    trainer = localtrain.create("mono-forward", model, num_classes=3)
    trainer.step(torch.randn(6, 5), torch.randint(0, 3, (6,)))
    assert trainer.predictor(torch.randn(2, 5)).shape == (2, 3)


def test_mono_forward_learns_digits(digits, batches, accuracy):
    x, y, xv, yv = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    trainer = localtrain.create("mono-forward", model, num_classes=10)
    for xb, yb in batches(x, y, 150):
        trainer.step(xb, yb)
    assert trainer.predictor is model
    assert accuracy(model, xv, yv) > 0.85  # chance is 0.1


class _ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(h + torch.relu(self.b(h)))

    def as_sequential(self):
        return nn.Sequential(self.a, nn.ReLU(), localtrain.Residual(nn.Sequential(self.b, nn.ReLU())), self.c)


def test_a_residual_block_is_one_local_unit_of_the_users_own_model():
    torch.manual_seed(0)
    model = _ResidualMLP().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    trainer = localtrain.create("mono-forward", model, num_classes=3)
    trainer.prepare(x)
    m2 = trainer.projections[1].weight.detach().clone().requires_grad_()
    w, bias = model.b.weight.detach().clone().requires_grad_(), model.b.bias.detach().clone().requires_grad_()
    h = torch.relu(model.a(x)).detach()
    trainer.step(x, y)
    loss = F.cross_entropy((h + torch.relu(h @ w.T + bias)) @ m2.T, y)
    grads = torch.autograd.grad(loss, [w, bias, m2])
    torch.testing.assert_close(model.b.weight.grad, grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.b.bias.grad, grads[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(trainer.projections[1].weight.grad, grads[2], rtol=0, atol=1e-12)
    assert trainer.predictor is model
