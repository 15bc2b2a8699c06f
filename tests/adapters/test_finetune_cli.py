"""``trainlab finetune``: adapters side by side on a fine-tuning workload, with the bench's accounting."""

from __future__ import annotations

import json

import pytest

from trainlab.cli import main


def test_finetune_compares_adapters_and_full(tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    code = main(
        [
            "finetune",
            "--adapter",
            "lora-ga,adalora,full",
            "--rank",
            "4",
            "--steps",
            "3",
            "--out",
            str(out),
            "--set",
            "adalora.r=4",
            "--callback",
            "adalora.init_warmup=0",
            "--callback",
            "adalora.final_warmup=1",
            "--callback",
            "adalora.target_rank=2",
        ]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["lora-ga", "adalora", "full"]
    assert rows[0]["trainable"] == 4 * (64 + 128) + 4 * (128 + 128)  # r (in + out) on the two hidden layers
    assert rows[1]["trainable"] == 4 * (64 + 128 + 1) + 4 * (128 + 128 + 1)
    assert rows[2]["trainable"] == rows[2]["total"]
    assert all(r["optimizer_state_bytes"] > 0 and len(r["curve"]) >= 1 for r in rows)
    assert "| lora-ga |" in (out / "report.md").read_text() and "| full |" in capsys.readouterr().out


def test_finetune_rejects_rank_for_a_method_without_one(tmp_path, capsys) -> None:
    code = main(["finetune", "--adapter", "sara", "--rank", "4", "--steps", "2", "--out", str(tmp_path)])
    assert code == 2
    assert "--rank: sara has no rank r" in capsys.readouterr().err


USER_MODULE = """
import torch
from torch import nn

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(10):
        x = torch.randn(8, 6, generator=g)
        out.append((x, x[:, :3].argmax(1)))
    return out

def hf_batches():
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 50, (4, 6), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
        for _ in range(5)
    ]
"""


def test_finetune_a_user_model_on_user_batches(tmp_path, monkeypatch) -> None:
    import torch

    (tmp_path / "ft_user_fixture.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "ft"
    args = ["finetune", "--model", "ft_user_fixture:make_model", "--data", "ft_user_fixture:batches"]
    code = main([*args, "--adapter", "lora,full", "--rank", "2", "--steps", "4", "--hp", "lr=0.0", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "full"]
    assert rows[0]["trainable"] == 2 * (6 + 16) + 2 * (16 + 3) and rows[1]["trainable"] == rows[1]["total"] == 163
    assert all(r["optimizer_state_bytes"] > 0 and r["peak_rss_bytes"] > 0 and r["wall_time_s"] > 0 for r in rows)
    import ft_user_fixture

    held_out = ft_user_fixture.batches()[-2:]  # the last fifth of 10 batches
    model = ft_user_fixture.make_model()
    with torch.no_grad():
        untrained = sum(float(torch.nn.functional.cross_entropy(model(x), y)) for x, y in held_out) / 2
    for row in rows:  # lr 0: the quality is the untouched model's loss on the held-out batches
        assert row["final_metric"] == pytest.approx(untrained, rel=1e-6)
    assert "evaluation loss" in (out / "report.md").read_text()


def test_finetune_a_hugging_face_directory(tmp_path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    (tmp_path / "ft_user_fixture.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "tiny-bert")
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tmp_path / "tiny-bert"), "--data", "ft_user_fixture:hf_batches"]
    code = main(
        [*args, "--adapter", "lora", "--rank", "2", "--targets", "query,value", "--steps", "2", "--out", str(out)]
    )
    assert code == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert row["trainable"] == 2 * 2 * (16 + 16)  # query and value of the one layer
    assert row["final_metric"] > 0


def test_finetune_model_without_data_is_refused(tmp_path, capsys) -> None:
    assert main(["finetune", "--model", "x:y", "--out", str(tmp_path)]) == 2
    assert "--model and --data go together" in capsys.readouterr().err
