import math

import torch
from torch import nn

from trainlab import localtrain
from trainlab.localtrain.noprop import NoProp, cosine_alpha_bar, posterior_coefficients


def test_cosine_schedule_runs_from_noise_to_label():
    ab = cosine_alpha_bar(10)
    assert ab[0] == 0 and (ab[1:] > ab[:-1]).all() and ab[-1] <= 0.9999
    t = torch.arange(11, dtype=torch.float64)
    expected = torch.cos(((10 - t) / 10 + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(ab[1:], expected[1:].clamp(max=0.9999), rtol=0, atol=1e-15)


def test_posterior_coefficients_are_gaussian_conditioning():
    ab = cosine_alpha_bar(10)
    a, b, c = posterior_coefficients(ab)
    for t in range(1, 11):
        var_now, var_before = 1 - ab[t], 1 - ab[t - 1]
        cov = (ab[t - 1] / ab[t]).sqrt() * var_now  # z_{t-1} = sqrt(α') z_t + noise
        torch.testing.assert_close(b[t - 1], cov / var_before, rtol=1e-12, atol=0)
        torch.testing.assert_close(a[t - 1], ab[t].sqrt() - cov / var_before * ab[t - 1].sqrt(), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(c[t - 1], var_now - cov**2 / var_before, rtol=1e-12, atol=1e-15)


def _model():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_each_block_learns_to_denoise_its_own_noisy_label_embedding():
    torch.manual_seed(0)
    template = _model().double()
    trainer = NoProp(template, num_classes=3, steps=4, eta=0.1, lr=1e-3, weight_decay=1e-3, inference="ddim", seed=3)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    trainer.prepare(x)
    net = trainer.network
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state = trainer.generator.get_state()
    trainer.step(x, y)
    trainer.generator.set_state(state)
    reference = type(net)(net.blocks, 3, 4, "ddim", x)
    reference.load_state_dict(before)
    u = reference.embed[y]
    for t in range(1, 5):
        noise = torch.randn(u.shape, generator=trainer.generator).double()
        z = reference.alpha_bar[t - 1].sqrt() * u.detach() + (1 - reference.alpha_bar[t - 1]).sqrt() * noise
        params = list(reference.blocks[t - 1].parameters())
        u_hat = torch.softmax(reference.blocks[t - 1](x, z), 1) @ reference.embed.detach()
        weight = 0.05 * (reference.snr[t] - reference.snr[t - 1])
        grads = torch.autograd.grad(weight * (u_hat - u.detach()).pow(2).sum(1).mean(), params)
        for g, p in zip(grads, net.blocks[t - 1].parameters(), strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert net.blocks[0].x_branch[0].weight.data_ptr() != template[0].weight.data_ptr()


def test_noprop_learns_digits(digits, batches, accuracy):
    x, y, xv, yv = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    trainer = localtrain.create("noprop", model, num_classes=10, steps=4, lr=3e-3)
    for xb, yb in batches(x, y, 150, size=128):
        trainer.step(xb, yb)
    assert accuracy(trainer.predictor, xv, yv) > 0.5  # chance is 0.1
