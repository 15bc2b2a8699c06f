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
        federate(FederateJob(strategy="fedsgd"))
    with pytest.raises(ValueError, match="--workload"):
        federate(FederateJob(workload="pylm"))


def test_cli_rejects_bad_flags_by_name(capsys, tmp_path):
    from trainlab.cli import main

    assert main(["federate", "--clients", "1", "--out", str(tmp_path)]) == 2
    assert "--clients must be an integer >= 2" in capsys.readouterr().err


def test_fedfix_runs_in_wall_time_on_both_engines_and_reports_failures(tmp_path):
    """`--strategy fedfix --speeds hetero`: the asynchronous driver in process and on the in-process grid's
    push/pull messages give the same curve (against simulated time), failures listed, the same files written."""
    pytest.importorskip("flwr")
    job = dict(strategy="fedfix", clients=4, rounds=2, eval_every=1, failure_rate=0.3, local_steps=1, batch_size=8)
    pure = federate(FederateJob(**job))
    flower = federate(FederateJob(engine="flower", **job), tmp_path)
    for name in ("fedfix", "fedavg"):
        assert [t for t, _ in pure["results"][name]["curve"]] == [t for t, _ in flower["results"][name]["curve"]]
        for (_, a), (_, b) in zip(pure["results"][name]["curve"], flower["results"][name]["curve"], strict=True):
            assert a == pytest.approx(b, abs=1e-3)  # float32 model vs the grid's float64 sum: same up to a flip
        assert [f[:2] for f in pure["results"][name]["failures"]] == [
            f[:2] for f in flower["results"][name]["failures"]
        ]
    assert pure["results"]["fedfix"]["failures"]
    # 4 clients with times 1.0, 0.7, 0.4, 0.1 and interval 0.5: FedFix aggregates every 0.5 time units; the
    # synchronous baseline once per time unit (waits for the slowest).
    assert [t for t, _ in pure["results"]["fedfix"]["curve"]] == [1.0, 2.0]
    assert len(pure["results"]["fedfix"]["participants_per_round"]) == 4
    assert len(pure["results"]["fedavg"]["participants_per_round"]) == 2
    assert pure["compute_times"] == pytest.approx([1.0, 0.7, 0.4, 0.1])
    report = (tmp_path / "report.md").read_text()
    assert "hetero speeds" in report and "mean participants / aggregation" in report
    rows = (tmp_path / "participation.csv").read_text().splitlines()
    assert rows[0] == "round,client0,client1,client2,client3" and len(rows) == 5  # one row per aggregation


def test_monna_against_byzantine_machines_on_both_engines(tmp_path):
    pytest.importorskip("flwr")
    job = dict(strategy="monna", byzantine=0.25, attack="alie", clients=4, rounds=3, eval_every=1, batch_size=8)
    job["hyperparameters"] = {"momentum": 0.5, "dampening": 0.5}
    pure = federate(FederateJob(**job))
    flower = federate(FederateJob(engine="flower", **job), tmp_path)
    assert pure["results"] == flower["results"]  # float32 through float64 messages is exact
    assert pure["results"]["monna"]["participants_per_round"] == [3, 3, 3]  # 1 of 4 machines is Byzantine
    assert pure["results"]["monna"]["curve"] != pure["results"]["fedavg"]["curve"]
    assert "1 Byzantine (alie attack)" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("job", "flag"),
    [
        (dict(byzantine=0.2), "--byzantine applies to --strategy monna"),
        (dict(strategy="monna", byzantine=0.5), "--byzantine must be a fraction"),
        (dict(strategy="monna", baseline="fedau"), "plain averaging"),
        (dict(strategy="monna", failure_rate=0.1), "--failure-rate does not apply to monna"),
        (dict(strategy="fedfix", baseline="fedau"), "--baseline for an asynchronous"),
        (dict(strategy="fedfix", engine="ray"), "--engine ray runs server strategies only"),
        (dict(baseline="fedfix"), "is not a synchronous server method"),
        (dict(strategy="fedfix", speeds="fast"), "--speeds"),
    ],
)
def test_asynchronous_and_monna_flags_are_checked(job, flag):
    with pytest.raises(ValueError, match=flag):
        federate(FederateJob(**job))


def test_cli_runs_fedfix_and_monna(tmp_path, capsys):
    pytest.importorskip("flwr")
    from trainlab.cli import main

    common = ["--clients", "4", "--rounds", "1", "--eval-every", "1", "--local-steps", "1", "--batch-size", "4"]
    assert main(["federate", "--strategy", "fedfix", "--speeds", "hetero", *common, "--out", str(tmp_path / "f")]) == 0
    assert "fedfix vs fedavg" in capsys.readouterr().out
    argv = ["federate", "--strategy", "monna", "--byzantine", "0.25", "--attack", "signflip", *common]
    assert main([*argv, "--out", str(tmp_path / "m")]) == 0
    assert "1 Byzantine (signflip attack)" in capsys.readouterr().out
    assert main([*argv, "--export-app", str(tmp_path / "app")]) == 2  # the app export is for server strategies
    assert "--export-app writes synchronous server strategies" in capsys.readouterr().err
    assert main(["federate", "--strategy", "fedfix", "--engine", "ray", *common]) == 2  # named before Ray is looked for
    assert "--engine ray runs server strategies only" in capsys.readouterr().err
