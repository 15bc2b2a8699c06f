"""Embedding tables quantized per row as an option: the packed rows are saved like any layer, the caller's result is
untouched, a table tied to a quantized layer stays as that layer's, and the CLI says which layers stayed dense."""

import json

import pytest
import torch
from torch import nn

from trainlab.compress import compress
from trainlab.compress.embeddings import quantize_embeddings
from trainlab.compress.export import load_model, save_model


class TextNet(nn.Module):
    def __init__(self, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(300, 32)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 300, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.hidden(self.embed(ids))))


def _net(tie=False):
    torch.manual_seed(0)
    net = TextNet(tie)
    with torch.no_grad():  # rows of very different norms: a shared scale would flatten the small ones
        net.embed.weight.mul_(torch.logspace(-2, 1, 300).unsqueeze(1))
    return net


def test_embeddings_are_quantized_per_row_and_saved_packed(tmp_path):
    net = _net()
    result = compress(net, [("hidden", "rtn", 4)])
    quantized = quantize_embeddings(result, 4)
    assert "embed" in result.report.dense and "embed" not in result.weights  # the input result is untouched
    assert torch.equal(result.model.embed.weight, net.embed.weight)
    q = quantized.weights["embed"]
    assert q.scale.shape == (300, 1) and q.bits == 4 and "embed" not in quantized.report.dense
    w = net.embed.weight.detach()
    # per-row scales: every row's error is small relative to that row, the smallest rows included
    rel = (quantized.model.embed.weight - w).norm(dim=1) / w.norm(dim=1)
    assert rel.max() < 0.2
    assert torch.equal(quantized.model.embed.weight, q.dequantize(torch.float32))
    plain = save_model(result.model, tmp_path / "a.safetensors", result.weights)
    packed = save_model(quantized.model, tmp_path / "b.safetensors", quantized.weights)
    assert packed < plain - 300 * 32 * 4 * 0.7  # the float32 table (38 kB) became 4-bit codes + fp16 scales
    back = load_model(tmp_path / "b.safetensors", TextNet)
    assert torch.equal(back.embed.weight, quantized.model.embed.weight)
    assert quantized.report.mean_bits == 4


def test_a_table_tied_to_a_quantized_head_stays_with_the_head():
    net = _net(tie=True)
    result = quantize_embeddings(compress(net, [(".*", "rtn", 4)]), 3)
    assert "embed" not in result.weights and "tied to a quantized layer" in result.report.dense["embed"]


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"bits": 9}, "bits"), ({"bits": 4, "compressor": "magnitude"}, "quantizer")]
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_embeddings(compress(_net(), [("hidden", "rtn", 4)]), **kwargs)


def test_cli_quantizes_a_bert_directory_s_embeddings_and_says_why_there_is_no_hf_export(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from trainlab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    sizes = {}
    for tag, extra in (("plain", []), ("emb", ["--embedding-bits", "4"])):
        out = tmp_path / tag
        assert main(["compress", "--model", str(tmp_path / "bert"), "--method", "rtn", "--bits", "4",
                     "--out", str(out), "--quiet", *extra]) == 0  # fmt: skip
        (run,) = json.loads((out / "results.json").read_text())["runs"]
        sizes[tag] = run["file_bytes_after"]
    assert (
        "embeddings.word_embeddings"
        in json.loads((tmp_path / "plain" / "results.json").read_text())["runs"][0]["dense_layers"]
    )
    assert not any("embeddings" in k for k in run["dense_layers"])
    assert "compressed-tensors packs nn.Linear weights" in run["hf_note"]
    assert sizes["emb"] < 0.6 * sizes["plain"]
