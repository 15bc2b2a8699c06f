import copy

import pytest
import torch
from torch import nn

from trainlab import localtrain
from trainlab.localtrain import split_blocks, train_blocks_locally


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_split_blocks_starts_each_block_at_a_parametric_layer():
    blocks = split_blocks(_mlp())
    assert [[type(m).__name__ for m in b] for b in blocks] == [
        ["Flatten", "Linear", "ReLU"],
        ["Linear", "Tanh"],
        ["Linear"],
    ]
    with pytest.raises(TypeError, match="nn.Sequential"):
        split_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no layer with parameters"):
        split_blocks(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("trained", [0, 1, 2])
def test_a_local_loss_reaches_only_its_own_block(trained):
    torch.manual_seed(0)
    model = _mlp().double()
    blocks = split_blocks(model)
    x = torch.randn(7, 6, dtype=torch.float64)

    def local_loss(i, h):
        return h.pow(2).sum() if i == trained else torch.zeros((), dtype=h.dtype, requires_grad=True)

    train_blocks_locally(blocks, x, local_loss)
    for i, block in enumerate(blocks):
        for p in block.parameters():
            assert (p.grad is not None) == (i == trained)
    # The reference: the block's loss on its input computed without any graph below it.
    with torch.no_grad():
        below = x
        for block in blocks[:trained]:
            below = block(below)
    reference = [p.detach().clone().requires_grad_() for p in blocks[trained].parameters()]
    layer = next(m for m in blocks[trained] if isinstance(m, nn.Linear))
    out = below.flatten(1) @ reference[0].T + reference[1]
    activation = blocks[trained][-1] if not isinstance(blocks[trained][-1], nn.Linear) else nn.Identity()
    grads = torch.autograd.grad(activation(out).pow(2).sum(), reference)
    torch.testing.assert_close(layer.weight.grad, grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, grads[1], rtol=0, atol=1e-12)


def test_registry_checks_names_and_ranges():
    assert {"mono-forward", "forward-forward", "eggroll"} <= set(localtrain.method_names())
    with pytest.raises(ValueError, match="unknown local-training method 'nope'"):
        localtrain.create("nope", _mlp(), num_classes=3)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        localtrain.create("mono-forward", _mlp(), num_classes=3, momentum=0.9)
    with pytest.raises(ValueError, match=r"lr must be a number in \[1e-06, 1.0\]"):
        localtrain.create("mono-forward", _mlp(), num_classes=3, lr=5.0)
    with pytest.raises(ValueError, match=r"embedding must be one of \['overwrite', 'append'\]"):
        localtrain.create("forward-forward", _mlp(), num_classes=3, embedding="sideways")
    with pytest.raises(ValueError, match="rank must be an integer"):
        localtrain.create("eggroll", _mlp(), num_classes=3, rank=2.5)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        localtrain.create("mono-forward", _mlp(), num_classes=1)
    for name in localtrain.method_names():
        spec = localtrain.get_spec(name)
        assert spec.paper and spec.summary and spec.supports
        assert set(spec.ranges) == set(spec.defaults)


def test_step_rejects_non_tensor_labels():
    trainer = localtrain.create("mono-forward", _mlp(), num_classes=3)
    with pytest.raises(TypeError, match="labels must be a tensor"):
        trainer.step(torch.randn(2, 6), [0, 1])


def test_state_dict_needs_prepare_and_round_trips():
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    trainer = localtrain.create("mono-forward", _mlp(), num_classes=3)
    trainer.step(x, y)
    state = copy.deepcopy(trainer.state_dict())  # as saved: the live state tensors keep changing
    fresh = localtrain.create("mono-forward", _mlp(), num_classes=3)
    with pytest.raises(RuntimeError, match="call prepare"):
        fresh.load_state_dict(state)
    fresh.prepare(x)
    fresh.load_state_dict(state)
    trainer.step(x, y)
    fresh.step(x, y)
    for a, b in zip(trainer.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("forward-forward", {"lr": 1e-2}),
        ("eggroll", {"population": 8, "chunk": 4, "sigma": 0.05}),
        ("noprop", {"steps": 2}),
    ],
)
def test_a_resumed_trainer_continues_exactly(name, hp):
    """Random draws (negatives, noise, ES directions) continue from the saved state, not from the seed."""
    import warnings

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def build():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return localtrain.create(name, _mlp(), num_classes=3, **hp)

    trainer = build()
    for _ in range(2):
        trainer.step(x, y)
    state = copy.deepcopy(trainer.state_dict())
    resumed = build()
    resumed.prepare(x)
    resumed.load_state_dict(state)
    for _ in range(2):
        trainer.step(x, y)
        resumed.step(x, y)
    for a, b in zip(trainer.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_method_carries_a_claim_and_a_docs_row():
    from pathlib import Path

    from trainlab.claims.registry import all_claims

    claimed = {c.method for c in all_claims()}
    assert set(localtrain.method_names()) <= claimed
    doc = (Path(__file__).resolve().parents[2] / "docs" / "localtrain.md").read_text()
    assert all(f"| `{name}` |" in doc for name in localtrain.method_names())
