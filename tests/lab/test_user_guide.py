"""Every example in docs/user-guide.md runs as written."""

import json
import re
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "user-guide.md"


def _block(name: str, language: str = "python") -> str:
    found = re.search(rf"<!-- example: {name} -->\n```{language}\n(.*?)```", DOC.read_text(), re.S)
    assert found, f"docs/user-guide.md lost its {name} example"
    return found.group(1)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    return tmp_path


def test_run_bench_example(in_tmp):
    exec(compile(_block("run-bench"), str(DOC), "exec"), {"__name__": "docs_example"})
    runs = json.loads((in_tmp / "bench-out" / "results.json").read_text())
    assert [r["algorithm"] for r in runs] == ["adamw", "muon"] and all(r["final_metric"] < 1.4 for r in runs)


def test_compress_example(in_tmp, capsys):
    exec(compile(_block("compress"), str(DOC), "exec"), {"__name__": "docs_example"})
    assert "embedding, one grid per row" in capsys.readouterr().out
    assert (in_tmp / "model-3bit.safetensors").stat().st_size < 0.25 * (100 * 64 * 2 + 64 * 64 + 100 * 64) * 4


def test_create_optimizer_example(in_tmp, capsys):
    exec(compile(_block("create-optimizer"), str(DOC), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert "| tok.weight | (50, 16) | embedding | adamw |" in out and "| fc.weight | (16, 16) | weight | muon |" in out


def test_config_example(in_tmp):
    from trainlab.cli import main

    exec(compile(_block("run-bench").split("from trainlab")[0], str(DOC), "exec"), {"__name__": "docs_example"})
    (in_tmp / "run.toml").write_text(_block("config", "toml"))
    assert main(["bench", "--config", "run.toml", "--seeds", "2"]) == 0
    resolved = json.loads((in_tmp / "bench-toml" / "run.json").read_text())["config"]
    assert resolved["seeds"] == 2 and resolved["schedule"] == "wsd" and resolved["algorithms"] == ["adamw", "sgd"]
