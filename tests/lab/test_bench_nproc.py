"""``trainlab bench --nproc 2``: torchrun on one machine and two torchrun "nodes" on loopback, digits-mlp, 2 steps.

Each test runs the CLI in subprocesses with a hard timeout; every process they start (torchrun puts its workers
in sessions of their own) is recorded while it runs and killed afterwards, and the test fails if one survives."""

import json
import subprocess
import sys
import time

import psutil
import pytest
import torch

from trainlab.lab.bench import BenchConfig
from trainlab.lab.distributed_run import (
    CommChoice,
    free_port,
    launch_bench,
    parse_compressors,
    shard_batch,
    torchrun_command,
)
from trainlab.lab.workloads import get_workload

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "import sys; from trainlab.cli import main; sys.exit(main())", "bench"]
COMMON = ["--workload", "digits-mlp", "--algorithms", "sgd", "--steps", "2", "--quiet"]
TIMEOUT_S = 240


def _run_all(commands, tmp_path):
    """Run the commands at once; (exit codes, outputs). Kills every process they spawned, whatever happens."""
    logs = [tmp_path / f"log{i}.txt" for i in range(len(commands))]
    procs = [
        subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        for cmd, log in zip(commands, logs, strict=True)
    ]
    seen = {}
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            for p in procs:
                try:
                    seen.update({c.pid: c for c in psutil.Process(p.pid).children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
            if time.monotonic() > deadline:
                pytest.fail(f"bench --nproc still running after {TIMEOUT_S} s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for child in seen.values():
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
        assert not alive, f"processes outlived the test: {alive}"
    return [p.returncode for p in procs], [log.read_text() for log in logs]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nproc")
    out = tmp / "out"
    cmd = [*CLI, *COMMON, "--nproc", "2", "--compressor", "allreduce,identity", "--compressor",
           "topk-ef21:ratio=0.1", "--out", str(out)]  # fmt: skip
    codes, logs = _run_all([cmd], tmp)
    assert codes == [0], logs[0][-3000:]
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_two_processes_write_the_report_with_bytes_per_step_per_compressor(one_node):
    results, report = one_node
    by = {r["compressor"]: r for r in results}
    assert sorted(by) == ["allreduce", "identity", "topk-ef21:ratio=0.1"]
    workload = get_workload("digits-mlp")
    dense = sum(p.numel() * 4 for p in workload.make_model().parameters())
    assert by["allreduce"]["bytes_sent_per_step"] == by["allreduce"]["dense_bytes_per_step"] == dense
    assert by["identity"]["bytes_sent_per_step"] == by["identity"]["dense_bytes_per_step"]
    topk = by["topk-ef21:ratio=0.1"]
    assert topk["bytes_sent_per_step"] < topk["dense_bytes_per_step"]  # EF21: dense first step, then 10%
    assert all(r["nproc"] == 2 and r["ranks_in_sync"] for r in results)
    assert "## Communication (2 processes, DDP)" in report and "| bytes/step |" in report
    assert all(f"| digits-mlp | sgd | {c} |" in report for c in by)
    assert "| sgd+topk-ef21:ratio=0.1 |" in report  # a row per compressor in the bench table too
    assert all(r["samples"] == 2 * workload.batch_size for r in results)  # both ranks' shards counted


def test_identity_hook_matches_plain_ddp_bitwise(one_node):
    by = {r["compressor"]: r for r in one_node[0]}
    assert by["identity"]["weights_sha256"] == by["allreduce"]["weights_sha256"]
    assert by["topk-ef21:ratio=0.1"]["weights_sha256"] != by["allreduce"]["weights_sha256"]


def test_two_nodes_on_loopback_equal_one_node_with_two_processes(one_node, tmp_path):
    port = free_port()
    out = tmp_path / "out"
    nodes = [
        [*CLI, *COMMON, "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
         "--master-port", str(port), "--out", str(out)]
        for rank in (0, 1)
    ]  # fmt: skip
    codes, logs = _run_all(nodes, tmp_path)
    assert codes == [0, 0], "\n---\n".join(log[-2000:] for log in logs)
    assert "node 1: done" in logs[1]
    (result,) = json.loads((out / "results.json").read_text())
    plain = next(r for r in one_node[0] if r["compressor"] == "allreduce")
    assert result["nproc"] == 2 and result["ranks_in_sync"]
    assert result["weights_sha256"] == plain["weights_sha256"]  # same ranks, same shards: bitwise the same run


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        (["gzip"], "unknown compressor 'gzip'"),
        (["topk:ratio=2"], "ratio"),
        (["topk-ef21-w"], "smoothness"),
        (["topk-ef21-w:smoothness=[1.0]"], "one L_i per rank"),
        (["sign-ef:init='full'"], "init applies"),
        (["allreduce:ratio=0.1"], "takes no options"),
        (["identity", "identity"], "distinct"),
    ],
)
def test_compressor_specs_are_checked_before_launch(specs, match):
    with pytest.raises(ValueError, match=match):
        parse_compressors(specs, world_size=2)


def test_shard_batch_gives_each_rank_its_contiguous_part():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    parts = [shard_batch((x, y), r, 3) for r in range(3)]
    assert all(isinstance(p, tuple) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert torch.equal(shard_batch(y, 1, 2), y[3:])
    with pytest.raises(ValueError, match="does not split over 4 ranks"):
        shard_batch((x, y), 0, 4)
    with pytest.raises(ValueError, match="one is a dict"):
        shard_batch({"x": x}, 0, 2)


def test_compressor_specs_parse_names_feedback_and_options():
    got = parse_compressors(["allreduce,count-sketch", "topk-ef21-w:ratio=0.05:smoothness=[1,3],sign-ef"], 2)
    assert got == [
        CommChoice("allreduce"),
        CommChoice("count-sketch", "count-sketch", "none"),
        CommChoice(
            "topk-ef21-w:ratio=0.05:smoothness=[1,3]", "topk", "ef21-w", {"ratio": 0.05}, {"smoothness": [1.0, 3.0]}
        ),  # fmt: skip
        CommChoice("sign-ef", "sign", "ef"),
    ]


def test_launcher_refuses_resume_and_bad_sizes_and_builds_torchrun_commands(tmp_path):
    config = BenchConfig(workloads=["digits-mlp"], algorithms=["sgd"], out=tmp_path, resume=True)
    with pytest.raises(ValueError, match="--resume"):
        launch_bench(config, nproc=2)
    with pytest.raises(ValueError, match="node_rank"):
        launch_bench(config, nproc=1, nnodes=2, node_rank=2)
    with pytest.raises(ValueError, match="local method"):
        launch_bench(BenchConfig(workloads=["digits-mlp"], algorithms=["forward-forward"], out=tmp_path), nproc=2)
    with pytest.raises(ValueError, match="sbm-gnn: --nproc splits batches of tensors"):
        launch_bench(BenchConfig(workloads=["sbm-gnn"], algorithms=["sgd"], out=tmp_path), nproc=2)
    with pytest.raises(ValueError, match="master-addr"):
        torchrun_command(tmp_path / "s.pkl", 1, nnodes=2)
    assert "--standalone" in torchrun_command(tmp_path / "s.pkl", 2)
    multi = torchrun_command(tmp_path / "s.pkl", 1, nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=5)
    assert multi[multi.index("--node-rank") + 1] == "1" and "--standalone" not in multi
