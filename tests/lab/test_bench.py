import json
import math

import pytest

from trainlab.cli import main
from trainlab.cli.bench import parse_hyperparameters
from trainlab.lab import bench as bench_module
from trainlab.lab.bench import BenchConfig, run_bench
from trainlab.lab.report import performance_ratios, profile_curve, profile_score
from trainlab.lab.workloads import base

RUN_KEYS = {
    "workload",
    "algorithm",
    "seed",
    "hyperparameters",
    "final_metric",
    "best_metric",
    "steps_to_target",
    "samples",
    "samples_to_target",
    "time_to_target_s",
    "wall_time_s",
    "step_time_ms_median",
    "peak_rss_bytes",
    "optimizer_state_bytes",
    "diverged",
    "curve",
}


@pytest.fixture
def registered_tiny(tiny, monkeypatch):
    monkeypatch.setitem(base._WORKLOADS, "tiny", lambda: tiny)
    return tiny


def test_bench_writes_results_report_and_plots(registered_tiny, tmp_path):
    config = BenchConfig(
        workloads=["tiny"],
        algorithms=["adamw", "sgd"],
        seeds=2,
        steps=30,
        out=tmp_path,
        hyperparameters={"sgd": {"lr": 0.05}},
        progress=False,
    )
    run_bench(config)
    runs = json.loads((tmp_path / "results.json").read_text())
    assert len(runs) == 4
    for run in runs:
        assert RUN_KEYS <= set(run)
        assert run["peak_rss_bytes"] > 0 and run["step_time_ms_median"] > 0
        assert [p["step"] for p in run["curve"]] == [10, 20, 30]
        assert set(run["curve"][0]) == {"step", "samples", "wall_time_s", "train_loss", "metric"}
        assert run["samples"] == 30 * base.get_workload("tiny").batch_size == run["curve"][-1]["samples"]
    by_alg = {r["algorithm"]: r for r in runs if r["seed"] == 0}
    # workload-tuned lr for adamw, the user's override for sgd
    assert by_alg["adamw"]["hyperparameters"]["lr"] == 1e-2
    assert by_alg["sgd"]["hyperparameters"]["lr"] == 0.05
    # Adam keeps two moments of every parameter plus one step counter per tensor (float32)
    n_params = 8 * 16 + 16 + 16 * 2 + 2
    assert by_alg["adamw"]["optimizer_state_bytes"] == 2 * 4 * n_params + 4 * 4
    report = (tmp_path / "report.md").read_text()
    assert "## tiny" in report and "| adamw | 2 |" in report and "Performance profile" in report
    for png in ("curves-tiny.png", "performance-profile.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_resume_reuses_finished_runs(registered_tiny, tmp_path):
    config = BenchConfig(
        workloads=["tiny"], algorithms=["adamw"], steps=20, out=tmp_path, progress=False, checkpoint_every=10
    )
    first = run_bench(config)
    again = run_bench(BenchConfig(**{**config.__dict__, "resume": True}))
    assert again[0]["curve"] == first[0]["curve"]


def test_diverged_run_is_recorded_not_raised(registered_tiny, tmp_path):
    runs = run_bench(
        BenchConfig(
            workloads=["tiny"],
            algorithms=["sgd"],
            steps=30,
            out=tmp_path,
            hyperparameters={"lr": float("inf")},
            progress=False,
        )
    )
    assert runs[0]["diverged"] and runs[0]["diverged_at_step"] is not None
    json.loads((tmp_path / "results.json").read_text())  # valid JSON: NaN written as null


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--workload", "nope"], "unknown workload 'nope'; choose one of:"),
        (["bench", "--workload", "tiny", "--algorithms", "nope"], "unknown optimizer 'nope'; choose one of:"),
        (["bench", "--workload", "tiny", "--hp", "nope=1"], "unknown hyperparameter(s) ['nope']"),
        (["bench", "--workload", "tiny", "--hp", "lr"], "--hp expects KEY=VALUE"),
        (["bench", "--workload", "tiny", "--seeds", "0"], "seeds must be a positive integer"),
    ],
)
def test_cli_errors_name_the_valid_choices(registered_tiny, tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "choose one of" in message:
        assert "tiny" in err or "adamw" in err


def test_unknown_workload_fails_before_any_training(registered_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_module, "train", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(ValueError):
        run_bench(BenchConfig(workloads=["tiny", "nope"], algorithms=["adamw"], out=tmp_path, progress=False))


def test_parse_hyperparameters():
    assert parse_hyperparameters(["lr=3e-4", "adamw.betas=0.9,0.95", "k=l2"]) == {
        "lr": 3e-4,
        "adamw": {"betas": (0.9, 0.95)},
        "k": "l2",
    }


def _run(workload, algorithm, seed, time):
    return {"workload": workload, "algorithm": algorithm, "seed": seed, "time_to_target_s": time}


def test_performance_profile_matches_hand_computation():
    results = [
        _run("w1", "a", 0, 10.0),
        _run("w1", "a", 1, 12.0),
        _run("w1", "a", 2, 50.0),  # median 12
        _run("w1", "b", 0, 24.0),
        _run("w1", "b", 1, None),
        _run("w1", "b", 2, 30.0),  # median 30
        _run("w2", "a", 0, None),
        _run("w2", "b", 0, 5.0),
    ]
    ratios = performance_ratios(results)
    assert ratios["a"] == {"w1": 1.0, "w2": math.inf}
    assert ratios["b"] == {"w1": 2.5, "w2": 1.0}
    assert profile_score(ratios["a"]) == pytest.approx((1.0 + 0.0) / 2)
    assert profile_score(ratios["b"]) == pytest.approx(((4 - 2.5) / 3 + 1.0) / 2)
    assert profile_curve(ratios["b"], [1.0, 2.0, 2.5, 4.0]) == [0.5, 0.5, 1.0, 1.0]
