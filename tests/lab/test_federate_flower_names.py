"""`trainlab federate` with Flower's own strategies by name (flwr-*), through with_participation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the federated extra (flwr) is a test dependency")

from trainlab.lab.federate import FLOWER_STRATEGIES, FederateJob, _run, federate  # noqa: E402

JOB = dict(workload="digits-mlp", clients=4, rounds=2, eval_every=1, participation="uniform", local_steps=2)


@pytest.mark.parametrize("name", sorted(FLOWER_STRATEGIES))
def test_flower_strategies_run_by_name_with_the_same_participation(name):
    run = _run(FederateJob(**JOB), name, {})
    fedavg = _run(FederateJob(**JOB), "fedavg", {})
    assert [h["participants"] for h in run.history] == [h["participants"] for h in fedavg.history]
    state = run.model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    moved = [not torch.equal(state[k], v) for k, v in fedavg.model.state_dict().items()]
    # Every Flower rule but Krum (one chosen client) aggregates differently from FedAvg on non-IID clients.
    assert any(moved) or name == "flwr-krum"


def test_federate_reports_a_flower_baseline(tmp_path):
    summary = federate(FederateJob(**JOB, strategy="fedau", baseline="flwr-fedmedian"), tmp_path)
    assert set(summary["results"]) == {"fedau", "flwr-fedmedian"}
    assert "| flwr-fedmedian |" in (tmp_path / "report.md").read_text()


def test_unknown_strategy_names_the_flag():
    with pytest.raises(ValueError, match="flwr-krum"):
        FederateJob(baseline="flwr-bulyan").check()
