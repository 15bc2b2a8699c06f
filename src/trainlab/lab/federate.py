"""What `trainlab federate` runs: a federated simulation of a built-in classification workload, and the
quadratic federated problems the claims measure (the papers' own sanity setting, where the optimum is known).

A workload's training set is split over the clients by Dirichlet(alpha) label proportions; participation follows a
pattern of `trainlab.federated.participation` whose rates the server never sees; each participant trains a copy of
the workload's model with trainlab's SGD on batches of its own data. The named strategy and the FedAvg baseline run
on the same data, participation and failures; the output directory gets ``results.json``, ``report.md``, the
validation curves and the per-round participation (``participation.csv`` and a plot).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainlab import federated
from trainlab.federated.participation import heterogeneous_probabilities, participation_matrix
from trainlab.federated.partition import dirichlet_partition
from trainlab.federated.simulate import FederatedRun, LocalTrainer, run_rounds
from trainlab.lab.bench_files import atomic_write_text, prepare_out
from trainlab.lab.workloads import get_workload
from trainlab.lab.workloads.digits import digits_data
from trainlab.lab.workloads.mnist1d import mnist1d_data
from trainlab.runtime import batch_generator

# Workloads whose training set can be partitioned: name -> (x_train, y_train, x_val, y_val).
DATA: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {
    "digits-mlp": digits_data,
    "digits-cnn": digits_data,
    "mnist1d-mlp": mnist1d_data,
}
PARTICIPATION = ("hetero", "uniform", "markov", "cyclic")
ENGINES = ("inprocess", "flower", "ray")
# Client speeds of the asynchronous strategies (fedfix, async): compute time of one local round per client.
SPEEDS = ("hetero", "uniform")
# What MoNNA's Byzantine machines send each step, from the honest machines' models [honest, dim].
ATTACKS = ("signflip", "alie")
# Flower's own strategies by name, as --strategy or --baseline: (class in flwr.serverapp.strategy, keyword defaults).
# They run in Flower's strategy loop (on the in-process grid under --engine inprocess), with the same participation.
FLOWER_STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "flwr-fedmedian": ("FedMedian", {}),
    "flwr-fedtrimmedavg": ("FedTrimmedAvg", {}),  # beta = 0.2 (Flower's default)
    "flwr-krum": ("Krum", {}),  # num_malicious_nodes = 0 (Flower's default)
    # Flower's default mu = 0 is FedAvg; 0.01 is one of the FedProx paper's grid {0.001, 0.01, 0.1, 1}.
    "flwr-fedprox": ("FedProx", {"proximal_mu": 0.01}),
    "flwr-fedadam": ("FedAdam", {}),  # eta = eta_l = 0.1, tau = 1e-3 (Flower's defaults)
}


def strategy_choices() -> list[str]:
    """What --strategy / --baseline accept: trainlab's synchronous server methods, then Flower's by name, then the
    asynchronous (fedfix, async) and peer-to-peer (monna) methods, which run on their own drivers."""
    return [
        *federated.strategy_names("server"),
        *FLOWER_STRATEGIES,
        *federated.strategy_names("asynchronous"),
        *federated.strategy_names("peer-to-peer"),
    ]


def strategy_kind(name: str) -> str:
    """``server`` (trainlab's or Flower's), ``asynchronous`` or ``peer-to-peer``."""
    return "server" if name in FLOWER_STRATEGIES else federated.get_spec(name).kind


def compute_times(speeds: str, clients: int) -> torch.Tensor:
    """Each client's time for one local round: ``hetero`` spread evenly over [1.0, 0.1] (client 0 the slowest, as
    in FedFix's "F-90" scenario), ``uniform`` 1.0 for all."""
    if speeds == "hetero":
        return torch.linspace(1.0, 0.1, clients, dtype=torch.float64)
    if speeds == "uniform":
        return torch.ones(clients, dtype=torch.float64)
    raise ValueError(f"--speeds must be one of {SPEEDS}, got {speeds!r}")


def byzantine_attack(attack: str, count: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The vectors ``count`` Byzantine machines send, from the honest models [honest, dim]: ``signflip`` the honest
    mean with its sign flipped, ``alie`` ("a little is enough") the honest mean minus 1.5 standard deviations per
    coordinate."""
    if attack == "signflip":
        return lambda params: (-params.mean(0)).expand(count, -1)
    if attack == "alie":
        return lambda params: (params.mean(0) - 1.5 * params.std(0)).expand(count, -1)
    raise ValueError(f"--attack must be one of {ATTACKS}, got {attack!r}")


@dataclass
class FederateJob:
    workload: str = "digits-mlp"
    strategy: str = "fedau"
    baseline: str = "fedavg"
    clients: int = 50
    rounds: int = 200
    participation: str = "hetero"
    alpha: float = 0.1
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 0.05
    failure_rate: float = 0.0
    seed: int = 0
    eval_every: int = 10
    engine: str = "inprocess"
    speeds: str = "hetero"  # asynchronous strategies only
    byzantine: float = 0.0  # monna only: the fraction of the clients that are Byzantine
    attack: str = "signflip"  # monna only
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return strategy_kind(self.strategy)

    @property
    def byzantine_count(self) -> int:
        return round(self.byzantine * self.clients)

    def check(self) -> None:
        if self.workload not in DATA:
            raise ValueError(
                f"--workload must be one of {sorted(DATA)} (a partitionable dataset), got {self.workload!r}"
            )
        for name in (self.strategy, self.baseline):
            if name not in strategy_choices():
                kinds = ", ".join(strategy_choices())
                raise ValueError(f"--strategy/--baseline must be one of {kinds}, got {name!r}")
        if self.kind == "server" and strategy_kind(self.baseline) != "server":
            raise ValueError(f"--baseline {self.baseline} is not a synchronous server method like --strategy")
        if self.kind == "asynchronous" and self.baseline not in ("fedavg", *federated.strategy_names("asynchronous")):
            raise ValueError(
                "--baseline for an asynchronous --strategy must be fedavg (synchronous, waits for the slowest "
                f"client), fedfix or async, got {self.baseline!r}"
            )
        if self.kind == "peer-to-peer" and self.baseline != "fedavg":
            raise ValueError(f"--baseline for --strategy monna must be fedavg (plain averaging), got {self.baseline!r}")
        if self.kind != "server" and self.engine == "ray":
            raise ValueError(f"--engine ray runs server strategies only; {self.strategy} runs on inprocess or flower")
        if self.speeds not in SPEEDS:
            raise ValueError(f"--speeds must be one of {SPEEDS}, got {self.speeds!r}")
        if self.attack not in ATTACKS:
            raise ValueError(f"--attack must be one of {ATTACKS}, got {self.attack!r}")
        if not 0 <= self.byzantine < 0.5:
            raise ValueError(f"--byzantine must be a fraction in [0, 0.5), got {self.byzantine!r}")
        if self.byzantine and self.kind != "peer-to-peer":
            raise ValueError("--byzantine applies to --strategy monna only")
        if self.kind == "peer-to-peer" and self.failure_rate:
            raise ValueError("--failure-rate does not apply to monna: a MoNNA step needs every honest machine")
        if self.participation not in PARTICIPATION:
            raise ValueError(f"--participation must be one of {PARTICIPATION}, got {self.participation!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        for flag, value, low in (
            ("--clients", self.clients, 2),
            ("--rounds", self.rounds, 1),
            ("--local-steps", self.local_steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--eval-every", self.eval_every, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.failure_rate < 1:
            raise ValueError(f"--failure-rate must be in [0, 1), got {self.failure_rate!r}")
        if not self.alpha > 0 or not self.lr > 0:
            raise ValueError("--alpha and --lr must be positive")


def participation_for(pattern: str, clients: int, rounds: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, matrix [rounds, clients])``: ``hetero`` is Bernoulli with rates spread over [0.02, 0.9];
    ``uniform`` Bernoulli with rate 0.5 for all; ``markov`` and ``cyclic`` use the hetero rates."""
    if pattern == "uniform":
        p = torch.full((clients,), 0.5, dtype=torch.float64)
    else:
        p = heterogeneous_probabilities(clients)
    kind = "bernoulli" if pattern in ("hetero", "uniform") else pattern
    return p, participation_matrix(kind, p, rounds, seed)


def _failures(rate: float, seed: int) -> Callable[[int, int], bool] | None:
    if rate == 0:
        return None
    return lambda client, rnd: (
        float(torch.rand(1, generator=batch_generator(seed + 7919, rnd * 100_003 + client))) < rate
    )


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from trainlab.runtime import evaluating

    with evaluating(model), torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


@dataclass
class Simulation:
    """What one strategy's run needs: the clients' trainer, the aggregator, who participates, the validation."""

    trainer: LocalTrainer
    aggregator: federated.Aggregator | None  # None for one of FLOWER_STRATEGIES
    matrix: torch.Tensor
    evaluate: Callable[[nn.Module], float]
    name: str
    hyperparameters: dict[str, Any]


def simulation(job: FederateJob, name: str, hp: dict[str, Any]) -> Simulation:
    """Strategy ``name``'s simulation of ``job``: the same data split, participation and failures for every name."""
    workload = get_workload(job.workload)
    x, y, x_val, y_val = DATA[job.workload]()
    parts = dirichlet_partition(y, job.clients, job.alpha, job.seed)
    _, matrix = participation_for(job.participation, job.clients, job.rounds, job.seed)

    def client_batch(client: int, rnd: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = parts[client]
        gen = batch_generator(job.seed, (rnd * job.clients + client) * job.local_steps + step)
        pick = idx[torch.randint(len(idx), (job.batch_size,), generator=gen)]
        return x[pick], y[pick]

    torch.manual_seed(job.seed)
    model = workload.make_model()
    trainer = LocalTrainer(
        model,
        workload.loss,
        client_batch,
        job.local_steps,
        "sgd",
        {"lr": job.lr, "momentum": 0.0},
        _failures(job.failure_rate, job.seed),
    )
    dim = sum(p.numel() for p in model.parameters())
    aggregator = None if name in FLOWER_STRATEGIES else federated.create(name, num_clients=job.clients, dim=dim, **hp)
    return Simulation(trainer, aggregator, matrix, lambda m: _evaluate(m, x_val, y_val), name, hp)


def _run(job: FederateJob, name: str, hp: dict[str, Any]) -> FederatedRun:
    if job.kind == "asynchronous":
        return _run_asynchronous(job, name, hp)
    if job.kind == "peer-to-peer":
        return _run_monna(job, name, hp)
    sim = simulation(job, name, hp)
    if job.engine == "inprocess" and sim.aggregator is not None:
        return run_rounds(sim.trainer, sim.aggregator, sim.matrix, evaluate=sim.evaluate, eval_every=job.eval_every)
    if job.engine == "ray":
        return _run_ray(job, sim)
    return _run_flower(job, sim)


def _run_flower(job: FederateJob, sim: Simulation) -> FederatedRun:
    from trainlab.federated.flower import LocalGrid, client_app

    return start_flower(job, sim, LocalGrid(client_app(sim.trainer), job.clients))


def _run_ray(job: FederateJob, sim: Simulation) -> FederatedRun:
    """The same run on Flower's Ray simulation engine (clients in Ray actors, one CPU each)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from trainlab.federated.flower import client_app

    runs: list[FederatedRun] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        runs.append(start_flower(job, sim, grid))

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"include_dashboard": False}}
    run_simulation(server, client_app(sim.trainer), job.clients, backend_config=backend)
    if not runs:
        raise RuntimeError("Flower's Ray simulation ended without finishing the run (see Flower's log above)")
    return runs[0]


def _run_asynchronous(job: FederateJob, name: str, hp: dict[str, Any]) -> FederatedRun:
    """``name`` (fedfix, async, or fedavg: synchronous rounds waiting for the slowest client) with the clients'
    ``compute_times`` until simulated time ``job.rounds`` (the slowest client's round takes 1.0); validation every
    ``job.eval_every`` time units. The same data split and failures as the server strategies."""
    from trainlab.federated.simulate import run_asynchronous

    sim = simulation(job, "fedavg", {})
    times = compute_times(job.speeds, job.clients)
    dim = sum(p.numel() for p in sim.trainer.model.parameters())
    if name == "fedavg":
        aggregator, scheme, interval = federated.create("fedavg", num_clients=job.clients, dim=dim), "sync", 1.0
    else:
        aggregator = federated.create(name, num_clients=job.clients, dim=dim, compute_times=times, **hp)
        scheme, interval = aggregator.scheme, aggregator.interval
    horizon = float(job.rounds)
    if job.engine == "inprocess":
        return run_asynchronous(
            sim.trainer,
            aggregator,
            times,
            horizon,
            scheme=scheme,
            interval=interval,
            evaluate=sim.evaluate,
            eval_every_time=float(job.eval_every),
        )
    from flwr.app import ArrayRecord

    from trainlab.federated.flower import LocalGrid, client_app
    from trainlab.federated.flower_drivers import run_asynchronous_on_grid

    model = copy.deepcopy(sim.trainer.model)
    grid = LocalGrid(client_app(sim.trainer), job.clients)
    grid_run = run_asynchronous_on_grid(
        grid,
        aggregator,
        ArrayRecord(model.state_dict()),
        times,
        horizon,
        scheme=scheme,
        interval=interval,
        evaluate=lambda x: sim.evaluate(_with_vector(model, x)),
        eval_every_time=float(job.eval_every),
    )
    model.load_state_dict(grid_run.arrays.to_torch_state_dict())
    return FederatedRun(model, grid_run.history, grid_run.failures)


def _with_vector(model: nn.Module, vector: torch.Tensor) -> nn.Module:
    """``model`` with its parameters set to copies of ``vector``'s pieces (never views of it)."""
    params = list(model.parameters())
    pieces = vector.split([p.numel() for p in params])
    with torch.no_grad():
        torch._foreach_copy_(params, [v.view_as(p).to(p.dtype) for v, p in zip(pieces, params, strict=True)])
    return model


def _run_monna(job: FederateJob, name: str, hp: dict[str, Any]) -> FederatedRun:
    """MoNNA's honest machines (``clients`` minus the Byzantine ones, each with a share of the data) take one
    stochastic gradient each per step (``job.rounds`` steps, lr ``job.lr``) while the Byzantine machines send
    ``job.attack``'s vectors; ``fedavg`` is plain averaging of everything received (D-SGD, no momentum). The
    metric is the validation accuracy of the honest machines' mean model."""
    workload = get_workload(job.workload)
    x, y, x_val, y_val = DATA[job.workload]()
    byzantine = job.byzantine_count
    honest = job.clients - byzantine
    parts = dirichlet_partition(y, honest, job.alpha, job.seed)
    torch.manual_seed(job.seed)
    model = workload.make_model()
    work = copy.deepcopy(model)
    params = list(work.parameters())
    dim = sum(p.numel() for p in params)
    if name == "fedavg":
        machine = federated.create("monna", num_clients=honest, dim=dim, byzantine=0, momentum=0.0, dampening=0.0)
    else:
        machine = federated.create("monna", num_clients=honest, dim=dim, byzantine=byzantine, **hp)

    def gradient(client: int, step: int, theta: torch.Tensor) -> torch.Tensor:
        idx = parts[client]
        gen = batch_generator(job.seed, step * honest + client)
        pick = idx[torch.randint(len(idx), (job.batch_size,), generator=gen)]
        _with_vector(work, theta)
        for p in params:
            p.grad = None
        work.train()
        workload.loss(work, (x[pick], y[pick])).backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    attack = byzantine_attack(job.attack, byzantine) if byzantine else None
    evaluate = lambda vector: _evaluate(_with_vector(model, vector), x_val, y_val)  # noqa: E731
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    if job.engine == "flower":
        from flwr.app import ArrayRecord

        from trainlab.federated.flower import LocalGrid
        from trainlab.federated.flower_drivers import gradient_app, run_monna_on_grid

        grid = LocalGrid(gradient_app(gradient), honest)
        grid_run, _ = run_monna_on_grid(
            grid,
            machine,
            ArrayRecord(copy.deepcopy(model).state_dict()),
            job.rounds,
            job.lr,
            attack=attack,
            evaluate=evaluate,
            eval_every=job.eval_every,
        )
        model.load_state_dict(grid_run.arrays.to_torch_state_dict())
        return FederatedRun(model, grid_run.history, grid_run.failures)
    theta = start.expand(honest, -1).to(machine.dtype).clone()
    run = FederatedRun(model)
    for step in range(job.rounds):
        grads = torch.stack([gradient(n, step, theta[n]) for n in range(honest)])
        theta = machine.step(theta, grads, job.lr, None if attack is None else attack(theta))
        record: dict[str, Any] = {"round": step, "time": float(step + 1), "participants": list(range(honest))}
        record["failed"] = []
        if (step + 1) % job.eval_every == 0 or step + 1 == job.rounds:
            record["metric"] = float(evaluate(theta.double().mean(0)))
        run.history.append(record)
    _with_vector(model, theta.double().mean(0))
    return run


def start_flower(job: FederateJob, sim: Simulation, grid: Any) -> FederatedRun:
    """``sim``'s strategy through Flower's ServerApp strategy loop on ``grid`` (the in-process grid, or a
    SuperLink's in a deployed app); the history is the one ``run_rounds`` writes."""
    import logging

    from flwr.app import ArrayRecord, MetricRecord

    from trainlab.federated.flower import TrainlabStrategy, with_participation

    run = FederatedRun(copy.deepcopy(sim.trainer.model))
    if sim.aggregator is None:
        from flwr.serverapp import strategy as flower_strategies

        cls, defaults = FLOWER_STRATEGIES[sim.name]
        kwargs = {**defaults, **sim.hyperparameters, "min_available_nodes": job.clients}
        strategy = with_participation(getattr(flower_strategies, cls), sim.matrix, **kwargs)
    else:
        strategy = TrainlabStrategy(sim.aggregator, sim.matrix, min_available_nodes=job.clients)

    def server_eval(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        if rnd == 0 or (rnd % job.eval_every and rnd != job.rounds):
            return None
        run.model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"metric": sim.evaluate(run.model)})

    logging.getLogger("flwr").setLevel(logging.WARNING)
    result = strategy.start(
        grid, ArrayRecord(sim.trainer.model.state_dict()), num_rounds=job.rounds, evaluate_fn=server_eval
    )
    failures = {(r, c) for r, c, _ in strategy.failures}
    run.failures = sorted(strategy.failures)  # Flower visits the sampled nodes in random order
    for t in range(job.rounds):
        failed = sorted(c for r, c in failures if r == t)
        present = [n for n in range(job.clients) if bool(sim.matrix[t, n]) and n not in failed]
        record: dict[str, Any] = {"round": t, "time": float(t + 1), "participants": present, "failed": failed}
        if (t + 1) in result.evaluate_metrics_serverapp:
            record["metric"] = float(result.evaluate_metrics_serverapp[t + 1]["metric"])
        run.history.append(record)
    run.model.load_state_dict(result.arrays.to_torch_state_dict())
    return run


def federate(job: FederateJob, out: Path | None = None) -> dict[str, Any]:
    """Run ``job.strategy`` and ``job.baseline`` on the same simulation; write the report files into ``out``."""
    job.check()
    if out is not None:
        prepare_out(out, asdict(job), overwrite=True)
    results = {}
    matrix = None
    for name, hp in ((job.strategy, job.hyperparameters), (job.baseline, {})):
        if name in results:
            continue
        run = _run(job, name, hp)
        # Asynchronous runs are measured in simulated wall time, the others per round (or MoNNA step).
        x_key = "time" if job.kind == "asynchronous" else "round"
        curve = [(h["time"] if x_key == "time" else h["round"] + 1, h["metric"]) for h in run.history if "metric" in h]
        results[name] = {
            "curve": curve,
            "final_accuracy": curve[-1][1],
            "participants_per_round": [len(h["participants"]) for h in run.history],
            "failures": [list(f) for f in run.failures],
        }
        if job.kind != "server" and matrix is None:  # who the strategy aggregated at each step
            width = job.clients - job.byzantine_count
            matrix = torch.zeros(len(run.history), width, dtype=torch.bool)
            for k, h in enumerate(run.history):
                matrix[k, h["participants"]] = True
    if job.kind == "server":
        p, matrix = participation_for(job.participation, job.clients, job.rounds, job.seed)
        probabilities = p.tolist()
    else:
        probabilities = None
    summary: dict[str, Any] = {"job": asdict(job), "probabilities": probabilities, "results": results}
    if job.kind == "asynchronous":
        summary["compute_times"] = compute_times(job.speeds, job.clients).tolist()
    if out is not None:
        _write(out, job, summary, matrix)
    return summary


def _write(out: Path, job: FederateJob, summary: dict[str, Any], matrix: torch.Tensor) -> None:
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    rows = ["round," + ",".join(f"client{n}" for n in range(matrix.shape[1]))]
    rows += [f"{t + 1}," + ",".join(str(int(v)) for v in row) for t, row in enumerate(matrix.tolist())]
    atomic_write_text(out / "participation.csv", "\n".join(rows) + "\n")
    if job.kind == "asynchronous":
        setting = (
            f"{job.clients} clients with {job.speeds} speeds (compute times {min(summary['compute_times']):.2f}.."
            f"{max(summary['compute_times']):.2f}; clients restart as soon as they finish, so --participation is "
            f"not used), simulated wall time {job.rounds} (the slowest round takes 1), curves against time"
        )
        per = "aggregation"
    elif job.kind == "peer-to-peer":
        setting = (
            f"{job.clients} machines, {job.byzantine_count} Byzantine ({job.attack} attack), {job.rounds} steps of "
            "one stochastic gradient per honest machine (all of them every step, so --participation is not used); "
            "accuracy of the honest machines' mean"
        )
        per = "step"
    else:
        setting = (
            f"{job.clients} clients, {job.rounds} rounds, participation {job.participation} (rates unknown to the "
            "server)"
        )
        per = "round"
    lines = [
        f"# trainlab federate: {job.strategy} vs {job.baseline} on {job.workload}",
        "",
        f"{setting}, Dirichlet alpha {job.alpha}, "
        + (
            f"one gradient per step (batch {job.batch_size}, lr {job.lr})"
            if job.kind == "peer-to-peer"
            else f"{job.local_steps} local SGD steps (lr {job.lr}, batch {job.batch_size})"
        )
        + f", engine {job.engine}, seed {job.seed}.",
        "",
        f"| strategy | final accuracy | best accuracy | mean participants / {per} | client failures |",
        "|---|---|---|---|---|",
    ]
    for name, r in summary["results"].items():
        best = max(v for _, v in r["curve"])
        mean_part = sum(r["participants_per_round"]) / len(r["participants_per_round"])
        lines.append(f"| {name} | {r['final_accuracy']:.4f} | {best:.4f} | {mean_part:.2f} | {len(r['failures'])} |")
    for name, r in summary["results"].items():
        if r["failures"]:
            listed = ", ".join(f"round {t} client {c} ({why})" for t, c, why in r["failures"][:20])
            more = f" and {len(r['failures']) - 20} more" if len(r["failures"]) > 20 else ""
            lines += ["", f"{name}: client failures, dropped from their round: {listed}{more}"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    _plot(out, summary, matrix)


def _plot(out: Path, summary: dict[str, Any], matrix: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in summary["results"].items():
        ax.plot(*zip(*r["curve"], strict=True), label=name)
    xlabel = "simulated wall time" if "compute_times" in summary else "round"
    ax.set(xlabel=xlabel, ylabel="validation accuracy", title=summary["job"]["workload"])
    ax.legend()
    _save(fig, out / "curves.png")
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.imshow(matrix.T.numpy(), aspect="auto", interpolation="nearest", cmap="Greys")
    ax.set(xlabel="round", ylabel="client", title="participation (black: participates)")
    _save(fig, out / "participation.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


# ---- quadratic federated problems (the claims' setting: the optimum is known exactly) ----


class QuadraticPoint(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


@dataclass
class QuadraticClients:
    """Client n minimises ``0.5 ||x - c_n||^2`` from noisy samples ``c_n + noise * z``; the federated optimum
    is the mean of the ``c_n``."""

    centres: torch.Tensor
    noise: float
    seed: int = 0

    @property
    def optimum(self) -> torch.Tensor:
        return self.centres.mean(0)

    def batch(self, client: int, rnd: int, step: int) -> torch.Tensor:
        gen = batch_generator(self.seed, (rnd * len(self.centres) + client) * 64 + step)
        return self.centres[client] + self.noise * torch.randn(
            self.centres.shape[1], generator=gen, dtype=torch.float64
        )

    @staticmethod
    def loss(model: nn.Module, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((model.x - target) ** 2).sum()

    def trainer(self, local_steps: int, lr: float, fail: Callable[[int, int], bool] | None = None) -> LocalTrainer:
        return LocalTrainer(
            QuadraticPoint(self.centres.shape[1]),
            self.loss,
            self.batch,
            local_steps,
            "sgd",
            {"lr": lr, "momentum": 0.0},
            fail,
        )

    def error(self, model: nn.Module) -> float:
        return float((model.x.detach() - self.optimum).norm())


def spread_centres(num_clients: int, dim: int, spread: float) -> torch.Tensor:
    """Optima spread evenly along the first axis over [-spread, spread] (client 0 at -spread)."""
    centres = torch.zeros(num_clients, dim, dtype=torch.float64)
    centres[:, 0] = torch.linspace(-spread, spread, num_clients, dtype=torch.float64)
    return centres


def mean_error(run: FederatedRun, last: int) -> float:
    """The mean of the evaluated errors over the last ``last`` evaluations."""
    values = [h["metric"] for h in run.history if "metric" in h][-last:]
    return math.fsum(values) / len(values)


def run_quadratic(
    problem: QuadraticClients, strategy: Any, participation: torch.Tensor, *, local_steps: int, lr: float
) -> FederatedRun:
    return run_rounds(problem.trainer(local_steps, lr), strategy, participation, evaluate=problem.error)
