"""``trainlab bench --adapters``: adapters side by side with the bench's results, report and plots."""

from __future__ import annotations

import json

import pytest

from trainlab.cli import main
from trainlab.lab.bench import BenchConfig, run_bench
from trainlab.lab.finetune import finetune
from trainlab.lab.workloads import get_workload

LORA_R4 = 4 * (64 + 128) + 4 * (128 + 128)  # r (in + out) on the digits MLP's two hidden layers


def test_bench_compares_adapters_with_the_bench_columns(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--workload", "digits-shifted", "--adapters", "lora,full", "--algorithms", "adamw,lion"]
    argv += ["--adapter-option", "lora.r=4", "--steps", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["algorithm"] for r in rows] == ["lora+adamw", "lora+lion", "full+adamw", "full+lion"]
    lora, full = rows[0], rows[2]
    assert lora["adapter"] == "lora" and lora["trainable_parameters"] == LORA_R4
    assert full["trainable_parameters"] == full["total_parameters"] == 26122
    # AdamW keeps two float32 moments per trainable parameter and a float32 step per tensor, Lion one moment:
    # frozen weights get no state (LoRA trains 4 tensors, full fine-tuning 6).
    assert lora["optimizer_state_bytes"] == 8 * LORA_R4 + 4 * 4 and rows[1]["optimizer_state_bytes"] == 4 * LORA_R4
    assert full["optimizer_state_bytes"] == 8 * 26122 + 4 * 6
    assert all(r["peak_rss_bytes"] > 0 and r["activation_peak_bytes"] > 0 and r["curve"] for r in rows)
    report = (out / "report.md").read_text()
    assert "| lora+adamw |" in report and "## Adapters side by side" in report
    assert f"| lora+adamw | {LORA_R4:,} |" in report and "| full+lion | 26,122 | 100.00% |" in report
    assert (out / "curves-digits-shifted.png").exists() and (out / "train-loss.csv").exists()
    assert "lora+lion" in capsys.readouterr().out


def test_bench_adapter_run_is_the_finetune_run(tmp_path) -> None:
    """The bench reuses lab.finetune: the same seed gives the same training curve, bit for bit."""
    w = get_workload("digits-shifted")
    config = BenchConfig(
        workloads=[w.name], algorithms=["adamw"], steps=4, out=tmp_path, progress=False, adapters=["lora-ga"]
    )
    [record] = run_bench(config)
    direct = finetune(w, "lora-ga", steps=4, eval_every=w.eval_every)
    assert [p["train_loss"] for p in record["curve"]] == [p["train_loss"] for p in direct.run.curve]
    assert record["trainable_parameters"] == direct.trainable


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adapters", "lorra"], "unknown adapter method 'lorra'"),
        (["--adapters", "lora", "--algorithms", "forward-forward"], "'forward-forward' is a local-training method"),
        (["--adapters", "lora", "--adapter-option", "bone.r=4"], "adapter option 'bone'"),
        (["--adapters", "lora", "--adapter-option", "lora.rank=4"], "unknown option(s) ['rank'] for lora"),
        (["--adapters", "lora", "--nproc", "2"], "--adapters runs in one process"),
    ],
)
def test_bench_adapters_refuse_bad_input_before_training(tmp_path, capsys, argv, message) -> None:
    base = ["bench", "--workload", "digits-shifted", "--steps", "2", "--out", str(tmp_path / "b"), "--quiet"]
    assert main(base + (argv if "--algorithms" in argv else [*argv, "--algorithms", "adamw"])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b" / "results.json").exists()


def test_adapter_init_does_not_depend_on_what_make_model_draws() -> None:
    """A workload's first make_model may build (and cache) its pretrained model from the global random stream; the
    adapter's random init must not shift with it (it did: the first LoRA run of a process differed from the rest)."""
    import dataclasses

    import torch

    w = get_workload("digits-shifted")
    drawing = dataclasses.replace(w, make_model=lambda: (torch.rand(7), w.make_model())[1])
    a = finetune(w, "lora", steps=1)
    b = finetune(drawing, "lora", steps=1)
    assert [p["train_loss"] for p in a.run.curve] == [p["train_loss"] for p in b.run.curve]
    torch.testing.assert_close(a.run.model[1].lora_A, b.run.model[1].lora_A, rtol=0, atol=0)
