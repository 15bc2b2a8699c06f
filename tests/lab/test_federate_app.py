"""`trainlab federate --export-app`: the exported Flower app, in process and on Flower's deployment engine."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the federated extra (flwr) is a test dependency")

from flwr.cli.config_utils import load_and_validate  # noqa: E402

from trainlab.federated.flower import LocalGrid, client_app  # noqa: E402
from trainlab.lab.federate import FederateJob, simulation, start_flower  # noqa: E402
from trainlab.lab.federate_app import PACKAGE, export_app, job_from_config  # noqa: E402

JOB = FederateJob(clients=2, rounds=2, eval_every=1, participation="uniform", seed=3)


def _reference(job: FederateJob = JOB) -> dict[str, torch.Tensor]:
    """The job's final model from `trainlab federate --engine flower` (Flower's loop on the in-process grid)."""
    sim = simulation(job, job.strategy, {})
    return start_flower(job, sim, LocalGrid(client_app(sim.trainer), job.clients)).model.state_dict()


def test_exported_app_is_a_valid_flower_app_that_runs_on_the_in_process_grid(tmp_path, monkeypatch):
    app_dir = export_app(JOB, tmp_path / "app")
    config, _ = load_and_validate(app_dir / "pyproject.toml", check_module=True)
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert job_from_config(run_config) == JOB
    monkeypatch.syspath_prepend(str(app_dir))
    client = importlib.import_module(f"{PACKAGE}.client_app").app
    server = importlib.import_module(f"{PACKAGE}.server_app").app
    from trainlab.lab import federate_app

    assert client is federate_app.client_app and server is federate_app.server_app
    grid = LocalGrid(client, JOB.clients)
    for context in grid.contexts.values():
        context.run_config = run_config  # what a SuperNode hands the ClientApp
    run = start_flower(JOB, simulation(JOB, JOB.strategy, {}), grid)
    for key, value in _reference().items():
        torch.testing.assert_close(run.model.state_dict()[key], value, rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(proc: subprocess.Popen) -> bool:
    """Whether any process of ``proc``'s process group is left (the leader is reaped first)."""
    proc.poll()
    pid = proc.pid
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process (Linux /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while being read
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(roots: list[int]) -> set[int]:
    """Every live process below ``roots`` (Flower detaches the SuperLink's SuperExec into its own session)."""
    table, found, frontier = _processes(), set(), set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def _live(pids: set[int]) -> set[int]:
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def _wait_for(port: int, deadline: float) -> None:
    while time.perf_counter() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no SuperLink listening on 127.0.0.1:{port}")


@pytest.mark.slow
def test_exported_app_runs_on_superlink_and_two_supernodes(tmp_path):
    """One SuperLink and two SuperNodes on 127.0.0.1 (insecure, free ports), runtime dependency installation off;
    `flwr run` submits the exported app unchanged. Every Flower process group is gone afterwards."""
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # One thread in the app processes, as in this test process (tests/conftest.py): the same summation order, so
    # the deployed model can equal the reference bit for bit.
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    result = tmp_path / "result.json"
    # One round, two clients: every ClientApp message starts a process that imports torch and Flower, loads the
    # data and trains (about 2.6 s of CPU each; 3.8 s before LocalTrainer stopped calling zero_grad, whose first
    # call imports torch._dynamo), and SuperNodes poll the SuperLink every 3 s (Flower's fixed interval).
    job = FederateJob(clients=2, rounds=1, eval_every=1, participation="uniform", seed=3, strategy="fedstale")
    app_dir = export_app(job, tmp_path / "app", str(result))
    commands = [
        ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(port)],
        *(
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port())]
            for _ in range(2)
        ),
    ]
    procs = []
    try:
        for i, command in enumerate(commands):
            log = open(tmp_path / f"node{i}.log", "wb")  # noqa: SIM115  (closed with the process)
            procs.append(
                subprocess.Popen(
                    [str(bin_dir / command[0]), *command[1:]], env=env, stdout=log, stderr=log, start_new_session=True
                )
            )
        _wait_for(port, deadline=time.perf_counter() + 30)
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app_dir), "local", "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,  # hard limit: a hung run fails the test, and the finally block still kills the nodes
        )
        assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.perf_counter() + 20  # the ServerApp writes its result as the run ends
        while not result.exists() and time.perf_counter() < deadline:
            time.sleep(0.2)
        assert result.exists(), (tmp_path / "node0.log").read_text()[-3000:]
    finally:
        spawned = _descendants([p.pid for p in procs])
        for proc in procs:
            if _alive(proc):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.perf_counter() + 15
        while any(_alive(p) for p in procs) and time.perf_counter() < deadline:
            time.sleep(0.2)
        for proc in procs:
            if _alive(proc):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pid in _live(spawned):  # detached children that outlived their parents
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    # No SuperLink, SuperNode, SuperExec or app process outlives the test.
    assert not any(_alive(p) for p in procs) and not _live(spawned)
    state = json.loads(result.read_text())["state"]
    reference = _reference(job)
    assert not all(
        torch.equal(torch.tensor(state[k], dtype=v.dtype), v)
        for k, v in simulation(job, "fedavg", {}).trainer.model.state_dict().items()
    )
    for key, value in reference.items():
        torch.testing.assert_close(torch.tensor(state[key], dtype=value.dtype), value, rtol=0, atol=0)


def test_cli_export_app_writes_the_app_without_running(tmp_path, capsys):
    from trainlab.cli import main

    out = tmp_path / "never-written"
    app_dir = tmp_path / "app"
    argv = ["federate", "--export-app", str(app_dir), "--clients", "4", "--rounds", "3", "--out", str(out)]
    assert main([*argv, "--hp", "cutoff=7"]) == 0
    config, _ = load_and_validate(app_dir / "pyproject.toml", check_module=False)
    job = job_from_config(config["tool"]["flwr"]["app"]["config"])
    assert (job.clients, job.rounds, job.hyperparameters) == (4, 3, {"cutoff": 7})
    assert "4 SuperNodes" in capsys.readouterr().out and not out.exists()
    assert main(["federate", "--export-app", str(app_dir), "--clients", "1"]) == 2  # checked like a run
