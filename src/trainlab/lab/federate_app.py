"""A `trainlab federate` job as a Flower app for Flower's deployment engine (SuperLink + SuperNodes).

``export_app(job, directory)`` writes a Flower app: ``pyproject.toml`` (the job's fields as the app's run config)
and a package whose ``server_app`` / ``client_app`` modules import the apps below. Both sides rebuild the job's
simulation from the run config (data split, participation, failures), so a deployed run gives the model the
in-process engines give. Client ``n`` is the ``n``-th smallest SuperNode id: run exactly ``clients`` SuperNodes.

The app declares no dependencies: trainlab and Flower must already be installed where the SuperLink and SuperNodes
run, with runtime dependency installation off (``flower-superlink --disable-runtime-dependency-installation``;
SuperNodes install nothing unless given ``--allow-runtime-dependency-installation``), or Flower would
``uv sync`` a fresh environment and pull a CUDA torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from functools import cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from trainlab.federated.flower import client_app as trainer_app
from trainlab.lab.bench_files import atomic_write_text
from trainlab.lab.federate import FederateJob, Simulation, simulation, start_flower

PACKAGE = "trainlab_fedapp"
RESULT_KEY = "result-path"  # run config: where the ServerApp writes the final model and curve ("" = nowhere)


def job_config(job: FederateJob) -> dict[str, Any]:
    """The job as a flat run config (TOML scalars; hyperparameters as a JSON string)."""
    config = {k.replace("_", "-"): v for k, v in asdict(job).items() if k != "hyperparameters"}
    config["hyperparameters"] = json.dumps(job.hyperparameters)
    return config


def job_from_config(config: dict[str, Any]) -> FederateJob:
    values = {f.name: config[f.name.replace("_", "-")] for f in fields(FederateJob) if f.name != "hyperparameters"}
    return FederateJob(**values, hyperparameters=json.loads(config["hyperparameters"]))


@cache
def _simulation(config_json: str) -> Simulation:
    job = job_from_config(json.loads(config_json))
    return simulation(job, job.strategy, job.hyperparameters)


server_app = ServerApp()


@server_app.main()
def _server(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    job = job_from_config(config)
    run = start_flower(job, simulation(job, job.strategy, job.hyperparameters), grid)
    if config.get(RESULT_KEY):
        state = {k: v.tolist() for k, v in run.model.state_dict().items()}
        result = {"state": state, "history": run.history, "failures": run.failures}
        atomic_write_text(Path(str(config[RESULT_KEY])), json.dumps(result))


client_app = ClientApp()


@client_app.train()
def _client(message: Message, context: Context) -> Message:
    config = {k: v for k, v in context.run_config.items() if k != RESULT_KEY}
    sim = _simulation(json.dumps(config, sort_keys=True))
    return trainer_app(sim.trainer)(message, context)


def export_app(job: FederateJob, directory: Path, result_path: str = "") -> Path:
    """Write ``job`` as a Flower app into ``directory`` (created; existing app files are replaced)."""
    job.check()
    if job.kind != "server":
        raise ValueError(
            f"--export-app writes synchronous server strategies; {job.strategy} ({job.kind}) runs with "
            "--engine inprocess or flower"
        )
    package = directory / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    config = {**job_config(job), RESULT_KEY: result_path}
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "trainlab-fedapp"',
        'version = "1.0.0"',
        f'description = "trainlab federate: {job.strategy} on {job.workload}"',
        "# trainlab and flwr must be installed where it runs; runtime dependency installation stays off.",
        "dependencies = []",
        "",
        "[tool.hatch.build.targets.wheel]",
        f'packages = ["{PACKAGE}"]',
        "",
        "[tool.flwr.app]",
        'publisher = "trainlab"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{PACKAGE}.server_app:app"',
        f'clientapp = "{PACKAGE}.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {json.dumps(value)}" for key, value in config.items()),
    ]
    atomic_write_text(directory / "pyproject.toml", "\n".join(lines) + "\n")
    atomic_write_text(
        package / "__init__.py", f'"""trainlab federate job exported as a Flower app ({job.strategy})."""\n'
    )
    for side in ("server", "client"):
        # Flower checks the component statically (an assignment named ``app``), so no ``import ... as app``.
        source = f"from trainlab.lab import federate_app\n\napp = federate_app.{side}_app\n"
        atomic_write_text(package / f"{side}_app.py", source)
    return directory
