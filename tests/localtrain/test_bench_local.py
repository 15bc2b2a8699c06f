"""Local methods in the lab: `trainlab bench` trains them next to backprop and measures what they hold."""

import pytest
import torch

from trainlab.lab.bench import BenchConfig, run_bench, validate
from trainlab.lab.local import split_batch
from trainlab.lab.workloads.sbm import sbm_graph


def test_bench_compares_local_methods_with_backprop(tmp_path):
    config = BenchConfig(
        workloads=["digits-mlp"],
        algorithms=["backprop", "mono-forward"],
        steps=40,
        out=tmp_path,
        progress=False,
    )
    results = {r["algorithm"]: r for r in run_bench(config)}
    assert set(results) == {"backprop", "mono-forward"}
    for r in results.values():
        assert r["final_metric"] > 0.2 and r["wall_time_s"] > 0 and r["peak_rss_bytes"] > 0
    # Measured: backprop holds every layer's activations at once, Mono-Forward one block's.
    assert 0 < results["mono-forward"]["activation_peak_bytes"] < results["backprop"]["activation_peak_bytes"]
    assert results["mono-forward"]["optimizer_state_bytes"] > 0  # Adam over the layers and the projections
    assert results["backprop"]["hyperparameters"]["lr"] == 3e-3  # the workload's tuned AdamW
    for r in results.values():  # measured energy, or None with the reason (these CPU machines have no counter)
        assert (r["energy_j"] is None) == (r["energy_per_sample_j"] is None)
        if r["energy_j"] is None:
            assert "RAPL: " in r["energy_note"]
        else:
            assert r["energy_per_sample_j"] == pytest.approx(r["energy_j"] / r["samples"])
    report = (tmp_path / "report.md").read_text()
    assert "| energy (J) | energy per sample (J) |" in report
    if results["backprop"]["energy_j"] is None:
        assert "| n/a | n/a |" in report and f"Energy n/a: {results['backprop']['energy_note']}." in report


def test_bench_rejects_schedules_and_unknown_settings_for_local_methods(tmp_path):
    with pytest.raises(ValueError, match="a schedule applies to optimizers"):
        validate(BenchConfig(workloads=["digits-mlp"], algorithms=["noprop"], schedule="wsd", out=tmp_path))
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        validate(
            BenchConfig(
                workloads=["digits-mlp"],
                algorithms=["gbnn"],
                hyperparameters={"gbnn": {"momentum": 0.9}},
                out=tmp_path,
            )
        )


def test_a_graph_batch_keeps_only_training_labels():
    graph = sbm_graph()
    (features, adjacency), labels = split_batch(graph)
    assert features is graph.features and adjacency is graph.adjacency
    assert (labels >= 0).sum() == len(graph.train_idx)
    assert torch.equal(labels[graph.train_idx], graph.labels[graph.train_idx])
    with pytest.raises(TypeError, match="needs \\(inputs, labels\\) batches or a Graph"):
        split_batch(torch.zeros(3))


def test_gbnn_runs_one_stage_per_step_on_the_whole_training_set(tmp_path):
    config = BenchConfig(
        workloads=["digits-mlp"],
        algorithms=["gbnn"],
        hyperparameters={"gbnn": {"total_units": 4, "units_per_stage": 2, "max_iter": 5}},
        out=tmp_path,
        progress=False,
    )
    with pytest.warns(UserWarning, match="replaced by a boosted"):
        (result,) = run_bench(config)
    assert result["steps"] == 2  # the method's own count: 4 units, 2 per stage
    assert result["final_metric"] > 0.2
    assert result["activation_peak_bytes"] > 0  # measured on a fresh trainer: a finished GBNN has no unit left


def test_a_local_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    from trainlab.lab import local
    from trainlab.lab.runner import train
    from trainlab.lab.workloads import get_workload

    workload = get_workload("digits-mlp")
    make = local.make_trainer(workload, "forward-forward", {"threshold": 2.0, "lr": 3e-3, "embedding": "overwrite"}, 0)
    path = tmp_path / "ff.pt"
    with pytest.warns(UserWarning, match="classifier head"):
        straight = train(workload, make, steps=12, eval_every=6)
    done = []

    def interrupt_after_seven_steps(n):
        done.append(n)
        if len(done) == 7:
            raise KeyboardInterrupt  # killed after step 7: the checkpoint of step 6 is on disk

    with pytest.warns(UserWarning, match="classifier head"), pytest.raises(KeyboardInterrupt):
        kw = {"checkpoint": path, "checkpoint_every": 6, "progress": interrupt_after_seven_steps}
        train(workload, make, steps=12, eval_every=6, **kw)
    with pytest.warns(UserWarning, match="classifier head"):
        resumed = train(workload, make, steps=12, eval_every=6, checkpoint=path, checkpoint_every=6, resume=True)
    assert resumed.train_losses == straight.train_losses  # the negatives' generator continued, not restarted
    for a, b in zip(straight.optimizer.trainer.parameters(), resumed.optimizer.trainer.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
