"""``trainlab finetune``: adapters side by side on a fine-tuning workload, with the bench's accounting."""

from __future__ import annotations

import json

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
