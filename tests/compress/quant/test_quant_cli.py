"""`trainlab compress --method rtn|nupes|ptqtp|... --bits B`: a run writes the packed file, results.json (pruning's
keys plus bits) and report.md; the file reloads to the same model the metric was measured on. Argument errors are
tested with pruning's, in tests/compress/test_cli.py."""

import json

import pytest
import torch

from trainlab.compress.quant.apply import load_quantized_model
from trainlab.compress.registry import allocator_names
from trainlab.lab.compression import trained_model
from trainlab.lab.workloads import get_workload

SIZES = {"1": 64 * 128, "3": 128 * 128, "5": 128 * 10}  # digits-mlp's Linear layers


@pytest.mark.parametrize(
    ("method", "allocator"),
    [
        (["--method", "ptqtp"], "hawq"),  # trit-planes have one fixed width
        (["--method", "ptqtp"], "baq"),
        (["--method", "ptqtp"], "evopress"),
        (["--method", "magnitude", "--sparsity", "0.5"], "hawq"),  # bit allocators don't prune
        (["--method", "magnitude", "--sparsity", "0.5"], "baq"),
    ],
)
def test_mixed_allocators_reject_fixed_width_methods_and_pruning(compress_cli, tmp_path, capsys, method, allocator):
    assert allocator in allocator_names("bits")
    assert compress_cli(tmp_path, tmp_path, "--workload", "digits-mlp", *method, "--allocator", allocator) == 2
    assert f"--allocator {allocator}" in capsys.readouterr().err


def test_rtn_3_bits_writes_results_report_and_a_packed_file_that_reloads(dense_steps, compress_cli, cache, tmp_path):
    out = tmp_path / "rtn"
    assert compress_cli(cache, out, "--workload", "digits-mlp", "--method", "rtn", "--bits", "3") == 0
    r = json.loads((out / "results.json").read_text())
    assert {"metric_before", "metric_after", "file_bytes_before", "file_bytes_after", "levels", "method",
            "allocator", "bits"} <= set(r)  # fmt: skip
    assert (r["method"], r["allocator"], r["bits"], r["second_order"]) == ("rtn", "uniform", 3, False)
    assert r["levels"] == dict.fromkeys(SIZES, 3)
    files = list(out.glob("model-rtn-*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size == r["file_bytes_after"]
    # codes at 3 bits + float16 scales per row + float32 biases + header (< 4 KB)
    nominal = sum(-(-n * 3 // 8) for n in SIZES.values()) + 2 * (128 + 128 + 10) + 4 * (128 + 128 + 10)
    assert nominal <= r["file_bytes_after"] < nominal + 4096
    assert r["file_bytes_after"] < r["file_bytes_before"] / 8
    w = get_workload("digits-mlp")
    reloaded = load_quantized_model(files[0], w.make_model)
    assert w.evaluate(reloaded) == pytest.approx(r["metric_after"], abs=0)
    dense = trained_model(w, 0, dense_steps, cache)
    assert r["metric_before"] == pytest.approx(w.evaluate(dense), abs=0)
    # the reloaded weights lie on a 3-bit grid: at most 8 distinct values per row
    weight = load_quantized_model(files[0], w.make_model, runtime="float")[3].weight
    assert max(len(torch.unique(row)) for row in weight) <= 8
    assert "| 3 (mean 3) |" in (out / "report.md").read_text()


def test_second_order_and_ptqtp_runs(compress_cli, cache, tmp_path):
    assert compress_cli(cache, tmp_path / "g", "--workload", "digits-mlp", "--method", "rtn", "--bits", "3",
                "--second-order", "--group-size", "32") == 0  # fmt: skip
    r = json.loads((tmp_path / "g" / "results.json").read_text())
    assert r["second_order"] is True and r["group_size"] == 32
    assert compress_cli(cache, tmp_path / "t", "--workload", "digits-mlp", "--method", "ptqtp") == 0
    t = json.loads((tmp_path / "t" / "results.json").read_text())
    assert t["bits"] == 3 and t["levels"] == dict.fromkeys(SIZES, 3)
    # two trit-planes: 3.2 bits per weight packed, more than 3-bit codes, much less than float32
    assert r["file_bytes_after"] < t["file_bytes_after"] < t["file_bytes_before"] / 7
    assert compress_cli(cache, tmp_path / "s", "--workload", "digits-mlp", "--method", "rtn", "--bits", "3",
                "--second-order", "--group-size", "32", "--sequential") == 0  # fmt: skip
    s = json.loads((tmp_path / "s" / "results.json").read_text())
    assert s["second_order"] is True and s["metric_after"] != r["metric_after"]  # later layers see other inputs


@pytest.mark.parametrize(("method", "allocator"), [("rtn", "hawq"), ("baq", "baq")])
def test_mixed_precision_allocators_keep_the_average_and_reload(compress_cli, cache, tmp_path, method, allocator):
    out = tmp_path / allocator
    args = ("--workload", "digits-mlp", "--method", method, "--bits", "3", "--allocator", allocator)
    assert compress_cli(cache, out, *args) == 0
    r = json.loads((out / "results.json").read_text())
    assert (r["allocator"], r["bits"]) == (allocator, 3)
    assert sum(r["levels"][k] * n for k, n in SIZES.items()) == pytest.approx(3 * sum(SIZES.values()))
    assert r["mean_bits"] == pytest.approx(3)
    w = get_workload("digits-mlp")
    (path,) = out.glob(f"model-{method}-*.safetensors")
    assert w.evaluate(load_quantized_model(path, w.make_model)) == pytest.approx(r["metric_after"], abs=0)
    assert r["file_bytes_after"] < r["file_bytes_before"] / 6
