"""PERP: only biases, norms and a masked LoRA train; the LoRA never touches pruned entries; merging is exact
and keeps the sparsity pattern (no densify-then-re-prune)."""

import copy

import pytest
import torch
from torch import nn

from trainlab.compress.masks import get_mask, masked_layers
from trainlab.compress.plan import Plan
from trainlab.compress.recover import MaskLoRALinear, attach_perp, merge_perp, recover_perp
from trainlab.lab.workloads import get_workload
from trainlab.runtime import batch_generator


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 256), nn.Linear(256, 8))


def _step(model: nn.Module, params, steps: int = 5) -> None:
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 256, generator=g)).pow(2).mean().backward()
        opt.step()


def test_trainable_set_is_biases_norms_and_lora_under_five_percent():
    model = _model()
    Plan([(".*", "magnitude", 0.7)]).apply(model)
    total = sum(p.numel() for p in model.parameters())
    params = attach_perp(model, rank=4)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == sorted(
        [f"{i}.base.bias" for i in (0, 3, 4)]
        + ["1.weight", "1.bias"]
        + [f"{i}.lora_{ab}" for i in (0, 3, 4) for ab in "AB"]
    )
    assert sum(p.numel() for p in params) / total < 0.05
    assert not any(m.base.weight.requires_grad for m in model.modules() if isinstance(m, MaskLoRALinear))


def test_lora_starts_at_the_pruned_model_and_never_writes_pruned_entries():
    model = _model()
    Plan([(".*", "magnitude", 0.7)]).apply(model)
    x = torch.randn(4, 256)
    before = model(x)
    pruned = {n: m.weight.detach().clone() for n, m in masked_layers(model).items()}
    params = attach_perp(model, rank=4)
    assert torch.equal(model(x), before)  # B = 0 at start
    _step(model, params)
    for m in model.modules():
        if isinstance(m, MaskLoRALinear):
            assert bool((m.delta()[~m.mask] == 0).all()) and bool((m.delta()[m.mask] != 0).any())
    out = model(x)
    merge_perp(model)
    assert torch.equal(model(x), out)  # merge is exact
    for name, layer in masked_layers(model).items():
        assert isinstance(layer, nn.Linear)
        assert torch.equal(layer.weight == 0, pruned[name] == 0)  # pattern unchanged, no densify
        assert not torch.equal(layer.weight, pruned[name])  # the kept weights did change
    assert all(p.requires_grad for p in model.parameters())


def test_mask_comes_from_zeros_when_no_mask_is_armed():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    with torch.no_grad():
        base.weight[:, ::2] = 0
    wrapped = MaskLoRALinear(base, rank=2, alpha=2.0)
    _step(nn.Sequential(nn.Linear(256, 16), wrapped), [wrapped.lora_A, wrapped.lora_B])
    merged = wrapped.merged()
    assert bool((merged.weight[:, ::2] == 0).all()) and get_mask(merged) is not None
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        MaskLoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)


def test_recover_perp_with_the_users_batches_and_loss_improves_the_pruned_model():
    w = get_workload("digits-mlp")
    torch.manual_seed(0)
    model = w.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        opt.zero_grad()
        w.loss(model, w.make_batch(64, batch_generator(0, step))).backward()
        opt.step()
    Plan([(".*", "magnitude", 0.8)]).apply(model)
    pattern = {n: m.weight == 0 for n, m in masked_layers(model).items()}
    pruned = copy.deepcopy(model)
    batches = [w.make_batch(64, batch_generator(1, step)) for step in range(40)]
    fraction = recover_perp(model, batches, w.loss, lr=3e-3)
    assert 0 < fraction < 0.15  # digits-mlp is tiny: rank-4 factors are ~9% of its 26k parameters
    assert w.evaluate(model) > w.evaluate(pruned)
    assert all(torch.equal(m.weight == 0, pattern[n]) for n, m in masked_layers(model).items())


class _DictModel(nn.Module):
    """A model called like a Hugging Face one: keyword tensors in, an output object with ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, input_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(input_values)}


def test_retrain_takes_dict_batches_and_a_loss_callable():
    torch.manual_seed(0)
    model = _DictModel()
    Plan([(".*", "magnitude", 0.5)]).apply(model)
    zeros = {n: m.weight == 0 for n, m in masked_layers(model).items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    batches = [{"input_values": x, "labels": (x[:, :4].argmax(1))} for _ in range(30)]

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(m(input_values=batch["input_values"])["logits"], batch["labels"])

    before = loss(model, batches[0]).item()
    recover_perp(model, batches, loss, lr=1e-2)
    assert loss(model, batches[0]).item() < before
    assert all(torch.equal(m.weight == 0, zeros[n]) for n, m in masked_layers(model).items())
