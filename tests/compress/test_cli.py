"""`trainlab compress`: argument errors name the argument (exit 2); runs write report.md, results.json (and a
plot for several sparsities), reuse the cached dense checkpoint, and dispatch every method."""

import json

import pytest
import torch
from safetensors import safe_open

from trainlab.cli import main
from trainlab.lab.compression import trained_model
from trainlab.lab.workloads import get_workload


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity"),
        (["--method", "magnitude", "--sparsity", "0.5,x"], "--sparsity"),
        (["--method", "magnitude"], "--sparsity"),
        (["--method", "nm", "--pattern", "4:2"], "--pattern"),
        (["--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4"], "--pattern"),
        (["--method", "nm", "--sparsity", "0.7"], "--sparsity for --method nm must be 1 - N/M = 0.5"),
        (["--method", "nm", "--allocator", "global"], "--allocator"),
        (["--method", "beta-rank", "--sparsity", "0.5", "--recover", "perp"], "--recover perp"),
        (["--method", "magnitude", "--sparsity", "0.5", "--allocator", "greedy"], "--allocator"),
        (["--method", "prune", "--sparsity", "0.5"], "--method"),
        (["--method", "magnitude", "--sparsity", "0.5", "--recover-steps", "0"], "--recover-steps"),
        # quantization methods (`--bits`)
        (["--method", "rtn"], "--bits"),
        (["--method", "rtn", "--bits", "9"], "--bits"),
        (["--method", "rtn", "--bits", "x"], "--bits"),
        (["--method", "rtn", "--bits", "2.5"], "--bits 2.5 is fractional"),
        (["--method", "rtn", "--bits", "3", "--sparsity", "0.5"], "--sparsity"),
        (["--method", "rtn", "--bits", "3", "--recover", "perp"], "--recover"),
        (["--method", "rtn", "--bits", "3", "--allocator", "global"], "--allocator global"),
        (["--method", "rtn", "--bits", "3", "--group-size", "0"], "--group-size"),
        (["--method", "ptqtp", "--bits", "4"], "--bits for --method ptqtp"),
        (["--method", "ptqtp", "--second-order"], "--second-order"),
        (["--method", "vptq", "--bits", "2", "--group-size", "8"], "--group-size"),
        (["--method", "vptq", "--bits", "5"], "--bits for --method vptq"),
        (["--method", "nupes", "--bits", "3", "--allocator", "baq"], "--allocator baq"),
        (["--method", "magnitude", "--sparsity", "0.5", "--bits", "3"], "--bits"),
        (["--method", "magnitude", "--sparsity", "0.5", "--second-order"], "--second-order"),
        (["--method", "rtn", "--bits", "3", "--sequential"], "--sequential orders the second-order calibration"),
        (["--method", "magnitude", "--sparsity", "0.5", "--sequential"], "--sequential"),
        (["--method", "quantize", "--bits", "3"], "--method"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, capsys, args, message):
    argv = ["compress", "--workload", "digits-mlp", *args, "--out", str(tmp_path), "--cache-dir", str(tmp_path)]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_unknown_workload_is_an_error(compress_cli, tmp_path, capsys):
    assert compress_cli(tmp_path, tmp_path, "--workload", "nope", "--method", "magnitude", "--sparsity", "0.5") == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err


def test_several_sparsities_write_results_report_plot_and_reuse_the_checkpoint(
    compress_cli, cache, dense_steps, tmp_path
):
    out = tmp_path / "a"
    assert compress_cli(cache, out, "--workload", "digits-mlp", "--method", "magnitude", "--sparsity", "0.5,0.9",
                "--allocator", "global") == 0  # fmt: skip
    (checkpoint,) = cache.glob(f"digits-mlp-seed0-steps{dense_steps}-*.pt")
    stamp = checkpoint.stat().st_mtime_ns
    r = json.loads((out / "results.json").read_text())
    assert {"metric_before", "metric_after", "file_bytes_before", "file_bytes_after", "levels", "method",
            "allocator", "sparsity"} <= set(r)  # fmt: skip
    assert (r["method"], r["allocator"], r["sparsity"]) == ("magnitude", "global", [0.5, 0.9])
    assert len(r["metric_after"]) == len(r["file_bytes_after"]) == len(r["levels"]) == len(r["runs"]) == 2
    assert all(b < r["file_bytes_before"] for b in r["file_bytes_after"])
    assert r["file_bytes_after"][1] < r["file_bytes_after"][0]
    sizes = {"1": 64 * 128, "3": 128 * 128, "5": 128 * 10}
    for s, levels in zip(r["sparsity"], r["levels"], strict=True):
        assert set(levels) == set(sizes)
        assert sum(levels[k] * n for k, n in sizes.items()) == pytest.approx(round(s * 25856), abs=0.1)
    assert (out / "metric_vs_sparsity.png").stat().st_size > 1000
    assert "| 0.9 |" in (out / "report.md").read_text()
    plan = json.loads((out / "plan-magnitude-0.9.json").read_text())
    assert [rule[0] for rule in plan] == ["1", "3", "5"]
    # a second run reuses the cached dense checkpoint: same model, same metric, checkpoint untouched
    assert (
        compress_cli(cache, tmp_path / "b", "--workload", "digits-mlp", "--method", "magnitude", "--sparsity", "0.9")
        == 0
    )
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["metric_before"] == r["metric_before"] and checkpoint.stat().st_mtime_ns == stamp
    assert not (tmp_path / "b" / "metric_vs_sparsity.png").exists()


def test_nm_with_perp_recovery(compress_cli, cache, tmp_path):
    assert compress_cli(cache, tmp_path, "--workload", "digits-mlp", "--method", "nm", "--pattern", "2:4",
                "--recover", "perp", "--recover-steps", "10") == 0  # fmt: skip
    r = json.loads((tmp_path / "results.json").read_text())
    assert (r["sparsity"], r["recover"], r["pattern"]) == (0.5, "perp", "2:4")
    assert r["levels"] == {"1": 0.5, "3": 0.5, "5": 0.5}
    with safe_open(str(tmp_path / "model-nm-0.5.safetensors"), framework="pt") as f:
        packed = json.loads(f.metadata()["trainlab.format"])["packed"]
        assert {d["kind"] for d in packed.values()} == {"nm"}


@pytest.mark.parametrize("allocator", ["layer-adaptive", "evopress"])
def test_calibrated_allocators_run(compress_cli, cache, tmp_path, allocator):
    assert compress_cli(cache, tmp_path, "--workload", "digits-mlp", "--method", "magnitude", "--sparsity", "0.8",
                "--allocator", allocator, "--calibration-batches", "2") == 0  # fmt: skip
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["allocator"] == allocator and r["file_bytes_after"] < r["file_bytes_before"]


def test_structured_method_dispatches_to_sliced_export(compress_cli, cache, tmp_path):
    assert compress_cli(cache, tmp_path, "--workload", "digits-cnn", "--method", "beta-rank", "--sparsity", "0.5") == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["levels"] == {"0": 8, "2": 16, "6": 10}  # output channels: half of 16 and 32 kept, classifier whole
    assert r["file_bytes_after"] < 0.6 * r["file_bytes_before"]


@pytest.mark.parametrize("bad", [b"truncated", None])
def test_an_unreadable_cached_checkpoint_is_named_retrained_and_replaced(tmp_path, bad):
    from trainlab.lab.compression import cache_name
    from trainlab.lab.hyperparameters import resolve_hyperparameters

    workload = get_workload("digits-mlp")
    path = tmp_path / cache_name(workload, 0, 5, resolve_hyperparameters("adamw", workload))
    if bad is None:
        torch.save({"weight": torch.zeros(3)}, path)  # a stale entry
    else:
        path.write_bytes(bad)
    with pytest.warns(UserWarning, match=f"cached dense model {path} cannot be read"):
        model = trained_model(workload, 0, 5, tmp_path)
    assert torch.equal(torch.load(path, weights_only=True)["1.weight"], model[1].weight)


def test_the_cache_is_keyed_on_what_changes_the_weights():
    import dataclasses

    from trainlab.lab.compression import cache_name

    w = get_workload("digits-mlp")
    name = cache_name(w, 0, 5, {"lr": 1e-3})
    assert name.startswith("digits-mlp-seed0-steps5-") and name == cache_name(w, 0, 5, {"lr": 1e-3})
    assert cache_name(w, 0, 5, {"lr": 2e-3}) != name
    assert cache_name(dataclasses.replace(w, batch_size=w.batch_size * 2), 0, 5, {"lr": 1e-3}) != name
    wider = dataclasses.replace(w, make_model=lambda: torch.nn.Sequential(torch.nn.Linear(64, 3)))
    assert cache_name(wider, 0, 5, {"lr": 1e-3}) != name


def test_nm_reports_the_real_sparsity_and_the_layers_it_left_dense(cache, tmp_path):
    out = tmp_path / "nm"
    args = ["--workload", "digits-cnn", "--method", "nm", "--pattern", "2:4", "--steps", "2", "--quiet"]
    assert main(["compress", *args, "--cache-dir", str(cache), "--out", str(out)]) == 0  # the weights don't matter
    r = json.loads((out / "results.json").read_text())
    assert list(r["dense_layers"]) == ["0"]  # the first conv has 1 input channel: not a multiple of M = 4
    assert "not a multiple of M=4" in r["dense_layers"]["0"] and r["levels"]["0"] == 0.0
    assert r["sparsity"] == 0.5 and 0.4 < r["achieved_sparsity"] < 0.5
    report = (out / "report.md").read_text()
    assert f"| 0.5 | {r['achieved_sparsity']:.4f} |" in report and "Left dense at sparsity 0.5: `0`" in report
