"""Claims of the federated methods (trainlab.federated), on quadratic federated problems whose optimum is known
(the papers' own sanity setting, and the spec's checks): client n minimises ``0.5 ||x - c_n||^2`` from noisy
samples, and the error is the distance of the global model to the optimum of the federated objective. Every run
goes through trainlab's in-process driver (local SGD on an nn.Module) with the pure aggregators; errors are the
mean over the last evaluations, so one lucky round does not decide a claim.
"""

from __future__ import annotations

import statistics

import torch

from trainlab import federated
from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.federated.asynchronous import AsyncAggregator
from trainlab.federated.fedstale import FedStale
from trainlab.federated.participation import heterogeneous_probabilities, participation_matrix
from trainlab.federated.simulate import run_asynchronous
from trainlab.lab.federate import QuadraticClients, mean_error, run_quadratic, spread_centres

F64 = torch.float64


@register_claim(
    "fedau-unknown-participation",
    method="fedau",
    paper="A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging (Wang & Ji, 2024)",
    promise="with heterogeneous participation rates unknown to the server, FedAU converges to the true optimum "
    "where FedAvg's participant average is biased",
    rule="40 clients, optima spread along one axis, Bernoulli rates 0.02..0.9 correlated with the optima, 5 noisy "
    "local SGD steps; mean error over the last 200 of 600 rounds: FedAU < 0.3 x FedAvg",
    fast=False,
)
def fedau_unknown_participation() -> ClaimResult:
    n, rounds = 40, 600
    problem = QuadraticClients(spread_centres(n, 5, 5.0), noise=1.0)
    part = participation_matrix("bernoulli", heterogeneous_probabilities(n), rounds, seed=1)
    errors = {}
    for name in ("fedau", "fedavg"):
        agg = federated.create(name, num_clients=n, dim=5, dtype=F64)
        errors[name] = mean_error(run_quadratic(problem, agg, part, local_steps=5, lr=0.05), 200)
    return ClaimResult(
        measured={"fedau error": round(errors["fedau"], 4)},
        baseline={"fedavg error": round(errors["fedavg"], 4)},
        passed=errors["fedau"] < 0.3 * errors["fedavg"],
        note="spec check (numpy, 3000 rounds): FedAvg 1.21, FedAU 0.20",
    )


@register_claim(
    "fedstale-high-heterogeneity",
    method="fedstale",
    paper="Leveraging stale client updates in federated learning (Rodio & Neglia, 2024)",
    promise="mixing in stale updates of absent clients beats FedAvg when data heterogeneity is high",
    rule="20 clients, optima spread 10 (high data heterogeneity), half the clients at rate 0.9, half at 0.5 "
    "(estimated online), 5 local steps; mean error over the last 100 of 300 rounds: beta 0.5 < beta 0 (FedAvg with "
    "unbiased weights) and < FedAvg's participant average",
    fast=False,
)
def fedstale_high_heterogeneity() -> ClaimResult:
    n, rounds = 20, 300
    problem = QuadraticClients(spread_centres(n, 5, 10.0), noise=1.0)
    p = torch.tensor([0.9, 0.5] * (n // 2), dtype=F64)
    part = participation_matrix("bernoulli", p, rounds, seed=2)
    errors = {}
    for beta in (0.0, 0.5, 1.0):
        run = run_quadratic(problem, FedStale(n, 5, F64, beta, 1.0), part, local_steps=5, lr=0.05)
        errors[f"beta {beta}"] = mean_error(run, 100)
    fedavg = mean_error(
        run_quadratic(
            problem, federated.create("fedavg", num_clients=n, dim=5, dtype=F64), part, local_steps=5, lr=0.05
        ),
        100,
    )
    passed = errors["beta 0.5"] < min(errors["beta 0.0"], fedavg)
    return ClaimResult(
        measured={
            "fedstale beta 0.5 error": round(errors["beta 0.5"], 4),
            "fedstale beta 1 (FedVARP) error": round(errors["beta 1.0"], 4),
        },
        baseline={"beta 0 (unbiased FedAvg) error": round(errors["beta 0.0"], 4), "fedavg error": round(fedavg, 4)},
        passed=passed,
    )


def _byzantine_run(rule: str, *, honest: int = 13, byzantine: int = 3, dim: int = 10, steps: int = 400) -> float:
    """Peer-to-peer SGD on heterogeneous quadratics under the spec's Byzantine attack (each step the Byzantine
    machines send mean - 1.5 std sign(mean) - 5 of the honest models); the error of the honest machines' average
    to the honest optimum. ``rule``: monna (NNA), average (D-SGD), krum or trimmed (Flower's Krum / trimmed mean,
    applied by every honest machine to what it receives)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(honest, dim, generator=gen, dtype=F64) * 3
    optimum = centres.mean(0)
    params = torch.zeros(honest, dim, dtype=F64)
    # MoNNA with the official momentum = dampening = 0.99: in steady state m = g, so lr is the same 0.05 step.
    lr, momentum, dampening = (0.05, 0.99, 0.99) if rule == "monna" else (0.05, 0.0, 0.0)
    machine = federated.create(
        "monna", num_clients=honest, dim=dim, dtype=F64, byzantine=byzantine, momentum=momentum, dampening=dampening
    )
    for _ in range(steps):
        grads = params - centres + torch.randn(honest, dim, generator=gen, dtype=F64)
        mean, std = params.mean(0), params.std(0)
        attack = (mean - 1.5 * std * torch.sign(mean) - 5).expand(byzantine, dim)
        if rule == "monna":
            params = machine.step(params, grads, lr, attack)
            continue
        half = params - lr * grads
        received = torch.cat([half, attack])
        params = _robust_mean(rule, received, byzantine).expand(honest, dim).clone()
    return float((params.mean(0) - optimum).norm())


def _robust_mean(rule: str, received: torch.Tensor, byzantine: int) -> torch.Tensor:
    import numpy as np
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    from flwr.serverapp.strategy.multikrum import select_multikrum

    if rule == "average":
        return received.mean(0)
    if rule == "trimmed":
        return torch.from_numpy(trim_mean(received.numpy(), byzantine / len(received)))
    if rule == "krum":
        contents = [RecordDict({"arrays": ArrayRecord([np.asarray(row)])}) for row in received.numpy()]
        chosen = select_multikrum(contents, byzantine, 1)[0]
        return torch.from_numpy(chosen["arrays"].to_numpy_ndarrays()[0])
    raise ValueError(rule)


@register_claim(
    "monna-byzantine",
    method="monna",
    paper="Robust Collaborative Learning with Linear Gradient Overhead (Farhadkhani et al., ICML 2023)",
    promise="nearest-neighbour averaging with momentum keeps the honest machines' error bounded under a Byzantine "
    "attack where plain averaging fails, at least as well as Krum or trimmed mean",
    rule="13 honest + 3 Byzantine machines, heterogeneous 10-D quadratics, gradient noise 1, 400 steps: MoNNA error "
    "< 1% of D-SGD's and <= min(Krum, trimmed mean) (Flower's implementations)",
    fast=False,
)
def monna_byzantine() -> ClaimResult:
    errors = {rule: _byzantine_run(rule) for rule in ("monna", "average", "krum", "trimmed")}
    passed = errors["monna"] < 0.01 * errors["average"] and errors["monna"] <= min(errors["krum"], errors["trimmed"])
    return ClaimResult(
        measured={"monna error": round(errors["monna"], 4)},
        baseline={f"{k} error": round(v, 4) for k, v in errors.items() if k != "monna"},
        passed=passed,
        note="spec check: D-SGD 60.4, NNA 0.065 (no momentum), 0.20 (momentum 0.9)",
    )


@register_claim(
    "fedfix-heterogeneous-speeds",
    method="fedfix",
    paper="A General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients Updates "
    "(Fraboni et al., JMLR 2023)",
    promise="with heterogeneous client speeds FedFix converges to the federated optimum where naive asynchronous "
    "FedAvg is biased toward the fast clients, and it gets there sooner than synchronous FedAvg",
    rule="10 clients, compute times 1.0..0.1 (fast clients hold the optima at one end), optimum at distance 8.9 "
    "from the start, 5 local steps, simulated wall time 60, seeds 0-2: on every seed mean error over the last 20 "
    "time units FedFix (interval 0.5) < naive async, and at time 10 FedFix < sync",
    fast=False,
)
def fedfix_heterogeneous_speeds() -> ClaimResult:
    n, dim, horizon = 10, 5, 60.0
    times = torch.linspace(1.0, 0.1, n, dtype=F64)
    # The optimum (the mean of the centres) is 4 per coordinate away from the start (the model starts at 0), so the
    # runs measure convergence in wall time, as the paper's training from scratch does; a start at the optimum
    # (this claim's first setup) measured only the noise floors.
    late: dict[str, list[float]] = {"fedfix": [], "async": [], "sync": []}
    early: dict[str, list[float]] = {"fedfix": [], "sync": []}
    for seed in range(3):
        problem = QuadraticClients(spread_centres(n, dim, 5.0) + 4.0, noise=0.5, seed=seed)
        for label, scheme, agg in (
            ("fedfix", "fedfix", federated.create("fedfix", num_clients=n, dim=dim, dtype=F64, compute_times=times)),
            ("async", "async", federated.create("async", num_clients=n, dim=dim, dtype=F64, compute_times=times)),
            ("sync", "sync", AsyncAggregator(n, dim, F64, torch.full((n,), 1.0 / n), 1.0, "sync")),
        ):
            run = run_asynchronous(
                problem.trainer(5, 0.05),
                agg,
                times,
                horizon,
                scheme=scheme,
                interval=getattr(agg, "interval", 1.0),
                evaluate=problem.error,
                eval_every_time=1.0,
            )
            evaluated = [(h["time"], h["metric"]) for h in run.history if "metric" in h]
            late[label].append(statistics.fmean(m for t, m in evaluated if t > horizon - 20))
            if label in early:
                early[label].append([m for t, m in evaluated if t <= 10.0][-1])
    passed = all(late["fedfix"][s] < late["async"][s] and early["fedfix"][s] < early["sync"][s] for s in range(3))

    def fmt(values: list[float]) -> str:
        return " / ".join(f"{v:.3f}" for v in values)

    return ClaimResult(
        measured={"fedfix late error (seeds 0-2)": fmt(late["fedfix"]), "fedfix error at t=10": fmt(early["fedfix"])},
        baseline={
            "naive async late error": fmt(late["async"]),
            "sync late error": fmt(late["sync"]),
            "sync error at t=10": fmt(early["sync"]),
        },
        passed=passed,
        note="sync's late noise floor is lower than FedFix's (every aggregation averages all clients); FedFix leads "
        "in wall time until sync catches up (seed 0: 0.18 vs 0.66 at t=10, 0.105 vs 0.084 at t=20)",
    )


def _curriculum_run(
    data_ordering: str,
    client_ordering: str,
    alpha: float | None,
    seed: int,
    *,
    rounds: int = 40,
    clients: int = 20,
    per_round: int = 5,
    local_steps: int = 10,
    disparity: bool = False,
    scoring: str = "expert",
) -> float:
    """FedAvg of a logistic regression on digits, the paper's way (its official code's reading): ``clients``
    clients split by Dirichlet(``alpha``) labels (``None``: IID), ``per_round`` of them per round, each ordering its
    samples by an expert's loss (a logistic regression trained on a held-out 5%) and pacing within its
    ``local_steps`` SGD steps (linear, a 0.8, b 0.2, at least 32 samples); ``random`` draws a new order every round.
    Clients are selected by ``client_schedule``: ``vanilla`` is plain random selection, the others the paper's
    ordered selection by the mean expert loss of a client's data (linear pacing a 0.8, b 0.2). ``disparity``: the
    official code's difficulty-ordered partition (each class cut in ascending expert loss, so clients differ in
    difficulty). ``scoring="global"``: samples and clients are scored by the loss of the current global model (the
    official code's ``G``; a client scores its data with the received model, the server rescores every client when
    it draws a new pool) instead of the expert's. Returns the mean validation accuracy over the last 5 rounds."""
    from torch import nn

    from trainlab.federated.curricula import ClientCurriculum, client_difficulty, local_pacing, order_by_difficulty
    from trainlab.federated.partition import dirichlet_partition
    from trainlab.federated.simulate import LocalTrainer, run_rounds
    from trainlab.lab.workloads.digits import digits_data
    from trainlab.runtime import batch_generator, evaluating

    x, y, x_val, y_val = (t.flatten(1) if t.is_floating_point() else t for t in digits_data())
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held, rest = perm[: len(y) // 20], perm[len(y) // 20 :]
    torch.manual_seed(0)
    expert = nn.Linear(64, 10)
    opt = torch.optim.SGD(expert.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(expert(x[held]), y[held]).backward()
        opt.step()
    with torch.no_grad():
        scores = torch.nn.functional.cross_entropy(expert(x), y, reduction="none")
    if alpha is None:
        shuffled = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
        parts = [shuffled[k::clients] for k in range(clients)]
    else:
        difficulty = scores[rest] if disparity else None
        parts = [rest[i] for i in dirichlet_partition(y[rest], clients, alpha, seed, 8, difficulty)]
    if scoring not in ("expert", "global"):
        raise ValueError(f"scoring must be expert or global, got {scoring!r}")
    orders = [p[order_by_difficulty(scores[p], data_ordering, seed=seed)] for p in parts]
    now = {"round": 0}  # the global round (run one round at a time below)

    def losses(model: nn.Module, part: torch.Tensor) -> torch.Tensor:
        with evaluating(model), torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x[part]), y[part], reduction="none")

    def batch(client: int, rnd: int, step: int):
        rnd = now["round"]
        if scoring == "global" and data_ordering != "random" and step == 0:  # the received model scores the data
            part = parts[client]
            orders[client] = part[order_by_difficulty(losses(trainer.work, part), data_ordering, seed=seed)]
        order = orders[client]
        if data_ordering == "random":  # the official code shuffles anew at every local training
            part = parts[client]
            order = part[torch.randperm(len(part), generator=batch_generator(seed + 1, rnd * clients + client))]
        allowed = order[: local_pacing(step, local_steps, len(order))]
        gen = batch_generator(seed, (rnd * clients + client) * local_steps + step)
        pick = allowed[torch.randint(len(allowed), (16,), generator=gen)]
        return x[pick], y[pick]

    def accuracy(model: nn.Module) -> float:
        with evaluating(model), torch.no_grad():
            return float((model(x_val).argmax(-1) == y_val).double().mean())

    selection = "random" if client_ordering == "vanilla" else client_ordering
    b = 1.0 if client_ordering == "vanilla" else 0.2
    curriculum = ClientCurriculum(clients, rounds, per_round, selection, a=0.8, b=b, seed=seed)
    torch.manual_seed(seed)
    trainer = LocalTrainer(
        nn.Linear(64, 10),
        lambda m, bt: torch.nn.functional.cross_entropy(m(bt[0]), bt[1]),
        batch,
        local_steps,
        "sgd",
        {"lr": 0.1, "momentum": 0.0},
    )
    dim = sum(p.numel() for p in trainer.model.parameters())
    fedavg = federated.create("fedavg", num_clients=clients, dim=dim)
    expert_client_scores = client_difficulty([scores[p] for p in parts])

    def client_scores() -> torch.Tensor:
        if scoring == "expert":
            return expert_client_scores
        return client_difficulty([losses(trainer.model, p) for p in parts])

    metrics = []
    for t in range(rounds):
        now["round"] = t
        row = torch.zeros(1, clients, dtype=torch.bool)
        row[0, curriculum.next_round(client_scores)] = True
        run = run_rounds(trainer, fedavg, row, evaluate=accuracy)
        trainer.model.load_state_dict(run.model.state_dict())  # the new global model
        metrics.append(run.history[0]["metric"])
    return statistics.fmean(metrics[-5:])


CURRICULA_SPLITS = {"alpha 0.05": 0.05, "alpha 0.2": 0.2, "alpha 0.9": 0.9, "IID": None}


@register_claim(
    "curricula-non-iid",
    method="curricula",
    paper="When Do Curricula Work in Federated Learning? (Vahidian et al., ICCV 2023)",
    promise="curriculum learning at the clients alleviates non-IIDness, and the more disparate the clients' data "
    "distributions the more they benefit from ordered learning",
    rule="digits logistic regression, 20 clients (5 per round, random selection), 40 rounds of FedAvg with 10 local "
    "SGD steps paced within the round (official code: linear a 0.8 b 0.2), samples ordered by an expert's loss; "
    "accuracy = mean of the last 5 rounds, averaged over seeds 0-2: the curriculum-minus-random gap is positive at "
    "Dirichlet alpha 0.05 and decreases strictly from alpha 0.05 to 0.2 to 0.9",
    fast=False,
)
def curricula_non_iid() -> ClaimResult:
    runs = {
        (o, split): [_curriculum_run(o, "vanilla", alpha, seed) for seed in range(3)]
        for o in ("curriculum", "random", "anti")
        for split, alpha in CURRICULA_SPLITS.items()
    }
    acc = {key: statistics.fmean(values) for key, values in runs.items()}
    gap = {split: acc["curriculum", split] - acc["random", split] for split in CURRICULA_SPLITS}
    seed_gaps = {
        split: [c - r for c, r in zip(runs["curriculum", split], runs["random", split], strict=True)]
        for split in CURRICULA_SPLITS
    }
    passed = gap["alpha 0.05"] > 0 and gap["alpha 0.05"] > gap["alpha 0.2"] > gap["alpha 0.9"]
    return ClaimResult(
        measured={f"curriculum {split} accuracy": round(acc["curriculum", split], 4) for split in CURRICULA_SPLITS},
        baseline={
            f"{o} {split} accuracy": round(acc[o, split], 4) for o in ("random", "anti") for split in CURRICULA_SPLITS
        },
        passed=passed,
        note="curriculum - random per seed: "
        + "; ".join(f"{split} " + " / ".join(f"{g:+.4f}" for g in seed_gaps[split]) for split in CURRICULA_SPLITS),
    )


@register_claim(
    "curricula-client-selection",
    method="curricula",
    paper="When Do Curricula Work in Federated Learning? (Vahidian et al., ICCV 2023)",
    promise="the proposed client selection (clients ordered by the difficulty of their data, easiest first, from a "
    "growing pool) benefits from the disparity of the clients and has a synergic effect with ordered learning",
    rule="the curricula-non-iid setting with data curriculum at the clients, on the official code's "
    "difficulty-ordered partition (each class cut in ascending expert loss, so the clients differ in difficulty), "
    "Dirichlet alpha 0.05 and 0.2, seeds 0-2: ordered client selection (linear a 0.8 b 0.2) beats random selection "
    "in mean accuracy at both alphas",
    weaker="clients are scored once by an expert's loss (the official code can also rescore with the global model)",
    known_failing="measured 2026-12-07 on the difficulty-ordered partition: ordered selection 0.737 / 0.834 vs "
    "random 0.791 / 0.889 at alpha 0.05 / 0.2 (anti-ordered 0.696 / 0.836); on a random-within-class partition "
    "0.686 / 0.828 vs 0.818 / 0.879",
    fast=False,
)
def curricula_client_selection() -> ClaimResult:
    alphas = (0.05, 0.2)
    acc = {
        (selection, alpha, disparity): statistics.fmean(
            _curriculum_run("curriculum", selection, alpha, seed, disparity=disparity) for seed in range(3)
        )
        for selection in ("curriculum", "vanilla", "anti")
        for alpha in alphas
        for disparity in (True, False)
    }
    passed = all(acc["curriculum", a, True] > acc["vanilla", a, True] for a in alphas)

    def label(selection: str, alpha: float, disparity: bool) -> str:
        name = {"curriculum": "ordered", "vanilla": "random", "anti": "anti-ordered"}[selection]
        return f"{name} selection alpha {alpha}{'' if disparity else ' (random-within-class partition)'} accuracy"

    return ClaimResult(
        measured={label("curriculum", a, d): round(acc["curriculum", a, d], 4) for d in (True, False) for a in alphas},
        baseline={
            label(s, a, d): round(acc[s, a, d], 4) for s in ("vanilla", "anti") for d in (True, False) for a in alphas
        },
        passed=passed,
    )


@register_claim(
    "admm-noise-robust",
    method="admm-dual-free",
    paper="Noise-Robust and Resource-Efficient ADMM-based Federated Learning (Lari et al., 2024)",
    promise="eliminating the dual variable (one noisy global model per client and iteration) and letting "
    "unscheduled clients keep updating lowers the steady-state error of ADMM over noisy links",
    rule="WLS, 20 clients, d 8, 30 samples each, rho 1, scheduling probability 0.5, 600 iterations, link noise "
    "sigma 0.01 / 0.05 / 0.2: mean ||z - w*||^2 over the last 200 iterations, dual-free with continued local "
    "updates (both modifications) < standard at every sigma",
    weaker="the dual-free recursion is our derivation from the abstract (exact elimination of u); the paper's "
    "Algorithm 1 was not found",
    known_failing="measured 2026-12-07: with both modifications MSD 1.4e-4 / 3.4e-3 / 5.5e-2 vs standard 7.8e-5 / "
    "2.0e-3 / 3.1e-2; the dual elimination alone passes (6.1e-5 / 1.5e-3 / 2.5e-2)",
    fast=False,
)
def admm_noise_robust() -> ClaimResult:
    from trainlab.federated.admm import NoisyConsensusADMM

    gen = torch.Generator().manual_seed(0)
    k, d, n = 20, 8, 30
    X = torch.randn(k, n, d, generator=gen, dtype=F64)
    S = torch.rand(k, n, generator=gen, dtype=F64) + 0.5
    y = X @ torch.randn(d, generator=gen, dtype=F64) + 0.1 * torch.randn(k, n, generator=gen, dtype=F64)
    A = X.transpose(1, 2) @ (S[..., None] * X)
    b = (X.transpose(1, 2) @ (S * y)[..., None]).squeeze(-1)
    optimum = torch.linalg.solve(A.sum(0), b.sum(0))
    variants = {
        "standard": {"variant": "standard"},
        "dual-free": {"variant": "dual-free", "continue_local": True},
        "dual-free, no continued updates": {"variant": "dual-free", "continue_local": False},
    }
    msd: dict[str, dict[float, float]] = {name: {} for name in variants}
    for sigma in (0.01, 0.05, 0.2):
        for name, kwargs in variants.items():
            admm = NoisyConsensusADMM(A, b, rho=1.0, noise=sigma, seed=1, **kwargs)
            schedule = torch.Generator().manual_seed(2)
            errors = [
                float(((admm.step(torch.rand(k, generator=schedule) < 0.5) - optimum) ** 2).sum()) for _ in range(600)
            ]
            msd[name][sigma] = statistics.fmean(errors[400:])
    passed = all(msd["dual-free"][s] < msd["standard"][s] for s in msd["standard"])
    proposed = [name for name in variants if name != "standard"]
    measured = {f"{name} MSD sigma {s}": f"{v:.3g}" for name in proposed for s, v in msd[name].items()}
    return ClaimResult(
        measured=measured,
        baseline={f"standard ADMM MSD sigma {s}": f"{v:.3g}" for s, v in msd["standard"].items()},
        passed=passed,
        note="the dual elimination alone beats standard ADMM at every sigma; the continued local updates of "
        "unscheduled clients speed up noise-free convergence but raise the noisy floor at rho 1 (at rho 20 both "
        "variants beat standard: 4.8e-5 and 4.5e-5 vs 7.7e-5 at sigma 0.01, measured while building)",
    )
