"""Bench runs a user can trust: resume refuses another configuration, Ctrl-C says how to resume."""

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
    err = capsys.readouterr().err
    assert "another run configuration" in err and "hyperparameters" in err and "'lr': 0.5" in err
    assert _bench(tmp_path, "--resume", "--schedule", "wsd") == 2
    assert "schedule: checkpoint None, now 'wsd'" in capsys.readouterr().err
    assert _bench(tmp_path, "--resume") == 0  # the same configuration resumes


def test_ctrl_c_prints_how_to_resume(registered_tiny, tmp_path, monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_module, "run_bench", interrupted)
    assert _bench(tmp_path) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
