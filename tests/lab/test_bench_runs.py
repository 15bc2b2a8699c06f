"""Bench runs a user can trust: resume refuses another configuration, Ctrl-C says how to resume."""

import json

import pytest

from trainlab.cli import main
from trainlab.lab import bench as bench_module
from trainlab.lab.workloads import base


@pytest.fixture
def registered_tiny(tiny, monkeypatch):
    monkeypatch.setitem(base._WORKLOADS, "tiny", lambda: tiny)
    return tiny


def _bench(out, *extra: str) -> int:
    return main(["bench", "--workload", "tiny", "--algorithms", "adamw", "--steps", "20", "--out", str(out),
                 "--quiet", *extra])  # fmt: skip


def test_resume_with_another_hp_or_schedule_is_refused_naming_the_field(registered_tiny, tmp_path, capsys):
    assert _bench(tmp_path) == 0
    assert _bench(tmp_path, "--resume", "--hp", "lr=0.5") == 2
    assert "another configuration (differs in: hyperparameters, runs)" in capsys.readouterr().err
    assert _bench(tmp_path, "--resume", "--schedule", "wsd") == 2
    assert "differs in: schedule" in capsys.readouterr().err
    assert _bench(tmp_path, "--resume") == 0  # the same configuration resumes
    # --overwrite replaces the results, but the checkpoints of the other configuration are still refused on resume
    assert _bench(tmp_path, "--resume", "--overwrite", "--hp", "lr=0.5") == 2
    assert "schedule" not in (err := capsys.readouterr().err) and "hyperparameters: checkpoint" in err


def test_a_results_directory_of_another_configuration_needs_overwrite(registered_tiny, tmp_path, capsys):
    assert _bench(tmp_path) == 0
    assert _bench(tmp_path, "--steps", "30") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _bench(tmp_path, "--steps", "30", "--overwrite") == 0
    assert json.loads((tmp_path / "run.json").read_text())["config"]["steps"] == 30


def test_an_unwritable_out_is_found_before_training(registered_tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _bench(blocker / "out") == 2
    assert f"--out {blocker / 'out'} cannot be written" in capsys.readouterr().err


def test_results_carry_provenance_and_configuration_and_a_training_loss_log(registered_tiny, tmp_path):
    import torch

    import trainlab

    assert _bench(tmp_path, "--seeds", "2") == 0
    run = json.loads((tmp_path / "run.json").read_text())
    p = run["provenance"]
    assert p["schema_version"] == 2 and p["trainlab"] == trainlab.__version__ and p["torch"] == torch.__version__
    assert p["threads"] >= 1 and p["date"].startswith("20") and "commit" in p
    assert run["config"]["runs"]["tiny/adamw"]["steps"] == 20 and run["config"]["seeds"] == 2
    assert run["config"]["runs"]["tiny/adamw"]["hyperparameters"]["lr"] == 1e-2
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(r["provenance"] == p for r in results)
    rows = (tmp_path / "train-loss.csv").read_text().splitlines()
    assert rows[0] == "workload,algorithm,seed,step,train_loss" and len(rows) == 1 + 2 * 20
    losses = [float(r.split(",")[-1]) for r in rows[1:21]]
    curve = results[0]["curve"]
    assert curve[0]["train_loss"] == pytest.approx(sum(losses[:10]) / 10)  # the same losses as the curve
    assert (tmp_path / "train-loss-tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_bar_shows_the_current_loss(registered_tiny, tmp_path, monkeypatch):
    shown = []
    from trainlab.lab import bench

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            pass

        def set_postfix_str(self, text):
            shown.append(text)

    monkeypatch.setattr(bench, "tqdm", Bar)
    bench.run_bench(bench.BenchConfig(workloads=["tiny"], algorithms=["adamw"], steps=20, out=tmp_path))
    assert shown[0] == "tiny adamw seed 0" and shown[1].startswith("tiny adamw seed 0 loss ")
    assert len(shown) == 3  # one per evaluation


def test_ctrl_c_prints_how_to_resume(registered_tiny, tmp_path, monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_module, "run_bench", interrupted)
    assert _bench(tmp_path) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err


def _record(algorithm, seed, final, diverged_at=None):
    return {"workload": "w", "algorithm": algorithm, "seed": seed, "metric": "accuracy", "higher_is_better": True,
            "target": 0.9, "final_metric": final, "best_metric": final, "steps_to_target": None,
            "samples_to_target": None, "time_to_target_s": None, "samples": 10, "wall_time_s": 1.0,
            "step_time_ms_median": 1.0, "peak_rss_bytes": 1, "optimizer_state_bytes": 1,
            "activation_peak_bytes": 1, "diverged": diverged_at is not None,
            "diverged_at_step": diverged_at}  # fmt: skip


def test_a_diverged_seed_counts_as_worst_in_medians_and_gets_a_line():
    from trainlab.lab.report import render_report

    runs = [_record("sgd", 0, 0.95), _record("sgd", 1, 0.5), _record("sgd", 2, None, diverged_at=7)]
    runs += [_record("adam", s, v) for s, v in enumerate((0.6, 0.7, 0.8))]
    runs += [_record("lion", s, 0.9 if s == 0 else None, None if s == 0 else 3) for s in range(3)]
    report = render_report(runs)
    assert "| sgd | 3 | 0.5000 | 0.5000 |" in report  # not 0.725, the median of the two finite seeds
    assert "| adam | 3 | 0.7000 |" in report
    assert "| lion | 3 | diverged | diverged |" in report
    assert "- sgd seed 2 diverged at step 7" in report
    assert "- lion seed 1 diverged at step 3" in report and "- lion seed 2 diverged at step 3" in report


def test_version(capsys):
    import trainlab

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"trainlab {trainlab.__version__}"


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["bench", "--workload", "digts-mlp"], "did you mean digits-mlp"),
        (["bench", "--workload", "tiny", "--algorithms", "adamW"], "did you mean adamw?"),
        (["bench", "--workload", "tiny", "--algorithms", "lino"], "did you mean lion"),
        (["bench", "--workload", "tiny", "--schedule", "wds"], "did you mean wsd"),
        (["compress", "--workload", "tiny", "--method", "magnitde", "--out", "x"], "did you mean magnitude?"),
        (["bnch"], "did you mean bench?"),
        (
            ["bench", "--workload", "tiny", "--hp", "adamW.lr=5"],
            "'adamW' (not in this bench); choose one of: sgd, adamw, lion, muon, stable-spam; did you mean adamw?",
        ),
    ],
)
def test_misspelled_names_get_a_suggestion(registered_tiny, tmp_path, capsys, argv, suggestion):
    try:
        code = main([*argv, "--out", str(tmp_path)] if argv[0] == "bench" else argv)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    assert suggestion in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_hp_values_for_a_later_algorithm_fail_before_anything_trains(registered_tiny, tmp_path, capsys):
    code = main(["bench", "--workload", "tiny", "--algorithms", "adamw,sgd", "--hp", "sgd.lr=-5", "--steps", "20",
                 "--out", str(tmp_path / "b"), "--quiet"])  # fmt: skip
    assert code == 2 and "hyperparameters of sgd on tiny: lr must be" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # nothing trained, nothing written
