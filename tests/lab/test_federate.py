"""`trainlab federate`'s lab side: both engines give the same run, failures are reported, files are written."""

from __future__ import annotations

import json

import pytest

from trainlab.lab.federate import FederateJob, federate


def test_inprocess_and_flower_engines_agree_and_write_the_report(tmp_path):
    pytest.importorskip("flwr")
    job = dict(clients=5, rounds=2, eval_every=1, failure_rate=0.3, local_steps=1, batch_size=8)
    pure = federate(FederateJob(**job))
    flower = federate(FederateJob(engine="flower", **job), tmp_path)
    for name in ("fedau", "fedavg"):
        assert pure["results"][name]["curve"] == flower["results"][name]["curve"]
        assert [f[:2] for f in pure["results"][name]["failures"]] == [
            f[:2] for f in flower["results"][name]["failures"]
        ]
    assert pure["results"]["fedau"]["failures"]  # rate 0.3 with seed 0 drops some: some dropped, all listed
    for file in ("results.json", "report.md", "participation.csv", "curves.png", "participation.png", "run.json"):
        assert (tmp_path / file).exists()
    assert json.loads((tmp_path / "results.json").read_text())["job"]["engine"] == "flower"
    assert "client failures" in (tmp_path / "report.md").read_text()


def test_bad_job_names_the_flag():
    with pytest.raises(ValueError, match="--participation"):
        federate(FederateJob(participation="sometimes"))
    with pytest.raises(ValueError, match="--strategy"):
        federate(FederateJob(strategy="monna"))
    with pytest.raises(ValueError, match="--workload"):
        federate(FederateJob(workload="pylm"))


def test_cli_rejects_bad_flags_by_name(capsys, tmp_path):
    from trainlab.cli import main

    assert main(["federate", "--clients", "1", "--out", str(tmp_path)]) == 2
    assert "--clients must be an integer >= 2" in capsys.readouterr().err
