"""Every calibrated allocator takes models whose output is a dict, a tuple or a Hugging Face ModelOutput, with
batches that are tensors, (inputs, targets) pairs or keyword dicts, and spends its budget exactly."""

import pytest
import torch
from torch import nn

from trainlab.compress import allocate_plan, allocator_specs, compress, compressible_layers


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return {"hidden": torch.relu(self.a(x)), "logits": self.b(torch.relu(self.a(x)))}


class TupleOut(DictOut):
    def forward(self, x):
        out = super().forward(x)
        return out["logits"], out["hidden"]


def _loss(model, batch):
    x, y = batch
    out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out[0]
    return nn.functional.cross_entropy(logits, y)


SPECS = [s for s in allocator_specs() if s.name != "uniform"]
SHORT = {"evopress": {"generations": 3, "offspring": 4}}  # the search itself is tested in test_allocate.py


@pytest.mark.parametrize("model_cls", [DictOut, TupleOut])
@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.name}-{s.budget}" for s in SPECS])
def test_calibrated_allocators_take_dict_and_tuple_outputs(model_cls, spec):
    torch.manual_seed(0)
    model = model_cls()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)) for _ in range(2)]
    budget = {"sparsity": 0.5} if spec.budget == "sparsity" else {"bits": 3}
    plan = allocate_plan(spec.name, model, calibration=batches, loss=_loss, **budget, **SHORT.get(spec.name, {}))
    result = compress(model, plan, calibration=batches, loss=_loss)
    sizes = {n: m.weight.numel() for n, m in compressible_layers(model).items()}
    if spec.budget == "sparsity":
        assert result.report.sparsity == pytest.approx(0.5, abs=1 / sum(sizes.values()))
    else:
        assert sum(result.bits[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(3, abs=0.02)


def test_hf_model_output_and_keyword_batches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8, num_labels=3)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 50, (4, 6))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0])}]
    for spec in SPECS:
        budget = {"sparsity": 0.5} if spec.budget == "sparsity" else {"bits": 4}
        # the output's own .loss, or its logits
        plan = allocate_plan(spec.name, model, calibration=batches, **budget, **SHORT.get(spec.name, {}))
        assert set(plan.resolve(model)) == set(compressible_layers(model))
