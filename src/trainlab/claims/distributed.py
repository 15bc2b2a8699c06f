"""Claims of the compressed-communication methods (trainlab.distributed).

The workers are simulated in one process (``SimulatedWorkers``): the same compressor and error-feedback code the
DDP hook runs, with payloads summed or gathered as the collectives would, and bytes counted from the payloads.
Spawning processes for hundreds of rounds would only add start-up time; the hook's equality with this code path is
what tests/distributed/test_ddp_hooks.py checks.
"""

from __future__ import annotations

import math

import torch

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.distributed import CountSketch, Identity, SimulatedWorkers, TopK
from trainlab.lab.workloads import get_workload
from trainlab.runtime import batch_generator

EF21_PAPER = "EF21: A New, Simpler, Theoretically Better, and Practically Faster Error Feedback"
EF_PAPER = "Error Feedback Reloaded: From Quadratic to Arithmetic Mean of Smoothness Constants"
SKETCH_PAPER = "Sketching for First Order Method: Efficient Algorithm for Low-Bandwidth Channel and Vulnerability"


def _digits_run(feedback: str, compressor, *, workers: int, steps: int, seed: int, momentum: bool) -> dict:
    """digits-mlp trained by SGD at the workload's lr 0.1 (plain, or with its tuned Nesterov momentum 0.9) on the
    aggregate of ``workers`` workers' gradients (each on its own batches) through ``compressor`` with ``feedback``,
    as DDP with the hook would; returns validation accuracy every 100 steps and the bytes one worker sent."""
    workload = get_workload("digits-mlp")
    torch.manual_seed(seed)
    model = workload.make_model()
    params = dict(model.named_parameters())
    hp = workload.hyperparameters["sgd"] if momentum else {"lr": workload.hyperparameters["sgd"]["lr"]}
    optimizer = torch.optim.SGD(model.parameters(), **hp)
    sim = SimulatedWorkers(workers, compressor, feedback, seed=seed)
    curve = []
    for step in range(steps):
        grads = []
        for w in range(workers):
            batch = workload.make_batch(workload.batch_size, batch_generator(seed * 1000 + w, step))
            loss = workload.loss(model, batch)
            grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
        for name, g in sim.aggregate(grads).items():
            params[name].grad = g
        optimizer.step()
        if (step + 1) % 100 == 0:
            curve.append(round(workload.evaluate(model), 4))
    return {"accuracy every 100 steps": curve, "MB sent per worker": round(sim.bytes_sent / 2**20, 2)}


@register_claim(
    "ef21-top1pct-digits-mlp",
    method="ef21",
    paper=EF21_PAPER,
    promise="With a contractive compressor (Top-1%), EF21 converges where compressed SGD without feedback stalls",
    rule="4 simulated workers, SGD lr 0.1 (the workload's; plain, the method EF21 analyses), 400 steps, seed 0: EF21 "
    "with Top-1% ends within 2 accuracy points of uncompressed SGD and at least 5 points above Top-1% without "
    "feedback",
    weaker="one seed, 4 workers; uncompressed plain SGD itself ends below digits-mlp's 0.95 target at 400 steps, so "
    "the rule compares against it; the same runs with Nesterov momentum 0.9 are reported, not judged",
    fast=False,
)
def ef21_top1pct_digits_mlp() -> ClaimResult:
    runs = {}
    for momentum in (False, True):
        run = {"workers": 4, "steps": 400, "seed": 0, "momentum": momentum}
        runs[momentum] = {
            "EF21 + Top-1%": _digits_run("ef21", TopK(ratio=0.01), **run),
            "Top-1% without feedback": _digits_run("none", TopK(ratio=0.01), **run),
            "uncompressed": _digits_run("none", Identity(), **run),
        }
    final = {k: r["accuracy every 100 steps"][-1] for k, r in runs[False].items()}
    ef21 = final["EF21 + Top-1%"]
    passed = ef21 >= final["uncompressed"] - 0.02 and ef21 - final["Top-1% without feedback"] >= 0.05
    plain = runs[False]
    return ClaimResult(
        measured={"EF21 + Top-1%": plain.pop("EF21 + Top-1%")},
        baseline=plain,
        passed=passed,
        note="with Nesterov momentum 0.9 (accuracy every 100 steps): "
        + "; ".join(f"{k} {v['accuracy every 100 steps']}" for k, v in runs[True].items()),
    )


def _least_squares_workers(smoothness: torch.Tensor, d: int, m: int, seed: int):
    """One least-squares problem f_i(x) = ||A_i x - b_i||^2 / (2m) per entry of ``smoothness``, A_i scaled so that
    f_i's smoothness constant L_i is that entry; returns (A, b, L_i measured, L of the mean f)."""
    g = torch.Generator().manual_seed(seed)
    n = smoothness.numel()
    a = torch.randn(n, m, d, generator=g, dtype=torch.float64)
    top = torch.linalg.eigvalsh(a.transpose(1, 2) @ a / m)[:, -1]
    a = a * (smoothness.double() / top).sqrt().view(n, 1, 1)
    b = torch.randn(n, m, generator=g, dtype=torch.float64)
    hess = a.transpose(1, 2) @ a / m
    return a, b, torch.linalg.eigvalsh(hess)[:, -1], float(torch.linalg.eigvalsh(hess.mean(0))[-1])


def _rounds_to(tol: float, sim: SimulatedWorkers, a, b, gamma: float, max_rounds: int) -> int | None:
    """Rounds of x <- x - gamma * aggregate until ||grad f(x)||^2 < tol (None if not within max_rounds)."""
    n, m, d = a.shape
    x = torch.zeros(d, dtype=torch.float64)
    for t in range(max_rounds):
        grads = list(torch.einsum("imd,im->id", a, torch.einsum("imd,d->im", a, x) - b) / m)
        full = torch.stack(grads).mean(0)
        if full.square().sum() < tol:
            return t
        x = x - gamma * sim.aggregate(grads)
    return None


def _ef21_vs_ef21w(smoothness: torch.Tensor, d: int = 50) -> dict:
    """Rounds to ||grad f||^2 < 1e-8 with Top-1 for EF21 and EF21-W, each at its theoretical step size."""
    n = smoothness.numel()
    a, b, li, big_l = _least_squares_workers(smoothness, d, 200, seed=0)
    alpha = 1 / d  # Top-1 is contractive with alpha = k/d
    theta = 1 - math.sqrt(1 - alpha)
    root = math.sqrt((1 - alpha) / theta / theta)  # sqrt(beta / theta), beta = (1 - alpha) / theta
    l_qm, l_am = float(li.square().mean().sqrt()), float(li.mean())
    gamma_ef21, gamma_w = 1 / (big_l + l_qm * root), 1 / (big_l + l_am * root)
    top1 = TopK(ratio=1 / d)
    ef21 = _rounds_to(1e-8, SimulatedWorkers(n, top1, "ef21"), a, b, gamma_ef21, 100_000)
    ef21w = _rounds_to(1e-8, SimulatedWorkers(n, top1, "ef21-w", smoothness=li.tolist()), a, b, gamma_w, 100_000)
    return {
        "EF21-W rounds": ef21w,
        "EF21 rounds": ef21,
        "speed-up": None if None in (ef21, ef21w) else round(ef21 / ef21w, 3),
        "L_QM / L_AM": round(l_qm / l_am, 3),
        "step sizes (EF21-W, EF21)": (gamma_w, gamma_ef21),
    }


@register_claim(
    "ef21w-vs-ef21-heterogeneous-smoothness",
    method="ef21-w",
    paper=EF_PAPER,
    promise="EF21-W's step size depends on the arithmetic mean of the workers' smoothness constants (L_AM) instead "
    "of their quadratic mean (L_QM), so it needs fewer rounds when the L_i differ",
    rule="10 least-squares workers, d=50, Top-1, each method at its theoretical step size, rounds to "
    "||grad f||^2 < 1e-8: EF21-W needs fewer rounds with L_i log-spaced over [1, 100], and at most half of EF21's "
    "with one outlier worker (nine at L_i=1, one at 100)",
    weaker="the specs' CPU check asked for 2x with the log-spaced L_i, where theory predicts L_QM/L_AM = 1.59x; "
    "the 2x requirement is checked on the outlier setting (L_QM/L_AM = 2.9). EF21 runs at its original (L_QM) "
    "step size; the paper's new analysis also allows the L_AM step for EF21 itself",
    fast=False,
)
def ef21w_vs_ef21() -> ClaimResult:
    spread = _ef21_vs_ef21w(torch.logspace(0, 2, 10))
    outlier = _ef21_vs_ef21w(torch.tensor([1.0] * 9 + [100.0]))
    passed = all(r["speed-up"] is not None for r in (spread, outlier))
    passed = passed and spread["speed-up"] > 1 and outlier["speed-up"] >= 2
    keep = ("EF21-W rounds", "speed-up", "L_QM / L_AM")
    return ClaimResult(
        measured={
            "L_i log-spaced [1, 100]": {k: spread[k] for k in keep},
            "one outlier": {k: outlier[k] for k in keep},
        },
        baseline={"EF21 rounds (log-spaced)": spread["EF21 rounds"], "EF21 rounds (outlier)": outlier["EF21 rounds"]},
        passed=passed,
        note=f"step sizes (EF21-W, EF21): log-spaced {spread['step sizes (EF21-W, EF21)']}, "
        f"outlier {outlier['step sizes (EF21-W, EF21)']}; rounds capped at 100000",
    )


@register_claim(
    "count-sketch-least-squares-optimum",
    method="count-sketch",
    paper=SKETCH_PAPER,
    promise="Sketched gradients (fresh shared sketch per round) keep first-order methods convergent with lower "
    "communication",
    rule="4 least-squares workers, d=256, count sketch with d/8 buckets and step size scaled by s/d: the loss gets "
    "within 1e-6 (relative) of the optimum while each round sends 1/8 of the dense bytes",
    weaker="total bytes to the tolerance are reported, not required to be lower: the smaller step needs more rounds",
    fast=False,
)
def count_sketch_least_squares() -> ClaimResult:
    n, d, m = 4, 256, 256
    a, b, _, big_l = _least_squares_workers(torch.ones(n), d, m, seed=1)
    flat_a, flat_b = a.reshape(-1, d), b.reshape(-1)
    x_star = torch.linalg.lstsq(flat_a, flat_b).solution
    loss = lambda x: float((flat_a @ x - flat_b).square().sum() / (2 * n * m))  # noqa: E731
    optimum = loss(x_star)

    def run(compressor, gamma: float) -> dict:
        sim = SimulatedWorkers(n, compressor, "none", seed=0)
        x = torch.zeros(d, dtype=torch.float64)
        for t in range(20_000):
            if loss(x) - optimum <= 1e-6 * optimum:
                return {"rounds": t, "bytes per round": sim.bytes_sent // max(t, 1), "total bytes": sim.bytes_sent}
            grads = list(torch.einsum("imd,im->id", a, torch.einsum("imd,d->im", a, x) - b) / m)
            x = x - gamma * sim.aggregate(grads)
        return {"rounds": None, "gap": loss(x) / optimum - 1, "total bytes": sim.bytes_sent}

    sketch = CountSketch(ratio=1 / 8)
    sketched = run(sketch, (1 / 8) / big_l)
    dense = run(Identity(), 1 / big_l)
    passed = sketched["rounds"] is not None and 8 * sketched["bytes per round"] == dense["bytes per round"]
    return ClaimResult(
        measured={"count sketch d/8": sketched},
        baseline={"dense gradient descent": dense},
        passed=passed,
        note=f"optimum loss {optimum:.6f}; step sizes 1/(8L) and 1/L, L = {big_l:.3f}",
    )


@register_claim(
    "msgc-vs-gc-bursty-stragglers",
    method="m-sgc",
    paper="Sequential Gradient Coding for Straggler Mitigation",
    promise="M-SGC tolerates bursty stragglers at a lower computational load than gradient coding, which shortens "
    "the total runtime",
    rule="n=16 workers, 300 rounds, lognormal(0, 0.02) delays with 5x slowdown bursts from a (B=2, W=6, lambda=3) "
    "model, mu=0.1, seeds 0-2: every M-SGC job decodes, its load is below GC's at the same tolerance (s=lambda=3), "
    "its runtime per job is at most GC's, and fractional-repetition decoding returns the exact gradient sum (1e-10)",
    weaker="synthetic delays, and a round's compute time is taken proportional to the load, so the runtime gain is "
    "the load ratio itself rather than the paper's 16% on AWS Lambda (where fixed costs dilute it)",
    fast=True,
)
def msgc_vs_gc() -> ClaimResult:
    from trainlab.distributed.gradient_coding import (
        bursty_delays,
        fractional_repetition_decode,
        simulate_gc,
        simulate_msgc,
    )

    n, b, w, lam = 16, 2, 6, 3
    per_job = {"m-sgc": [], "gc": []}
    fallbacks = {"m-sgc": [], "gc": []}
    for seed in range(3):
        delays = bursty_delays(n, 300, b=b, w=w, lam=lam, seed=seed)
        msgc, gc = simulate_msgc(delays, b, w, lam), simulate_gc(delays, lam)
        for key, r in (("m-sgc", msgc), ("gc", gc)):
            per_job[key].append(round(r.runtime / r.jobs, 4))
            fallbacks[key].append(r.fallback_rounds)
    # Exact decoding: a least-squares gradient over 4 partitions, each computed by a group of s+1 = 4 workers.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 32, 8, generator=g, dtype=torch.float64)
    y = torch.randn(4, 32, generator=g, dtype=torch.float64)
    x = torch.randn(8, generator=g, dtype=torch.float64)
    partials = torch.einsum("pmd,pm->pd", a, a @ x - y).repeat_interleave(lam + 1, dim=0)
    straggler = torch.zeros(n, dtype=torch.bool)
    straggler[[1, 6, 11]] = True  # 3 stragglers, in three different groups
    error = float((fractional_repetition_decode(partials, straggler, lam) - partials[:: lam + 1].sum(0)).abs().max())
    passed = msgc.load < gc.load and all(m <= c for m, c in zip(per_job["m-sgc"], per_job["gc"], strict=True))
    passed = passed and error <= 1e-10
    return ClaimResult(
        measured={
            "load": round(msgc.load, 4),
            "runtime per job": per_job["m-sgc"],
            "fallback rounds": fallbacks["m-sgc"],
        },
        baseline={"load": gc.load, "runtime per job": per_job["gc"], "fallback rounds": fallbacks["gc"]},
        passed=passed,
        note=f"all M-SGC jobs decoded (a failure raises); fractional-repetition decoding error {error:.1e}; "
        "fallback rounds: the pattern broke the model and the master waited for every worker",
    )


@register_claim(
    "srsgc-vs-gc-bursty-stragglers",
    method="sr-sgc",
    paper="Sequential Gradient Coding for Straggler Mitigation",
    promise="GC with selective repetition of previously unfinished tasks improves straggler mitigation over GC",
    rule="n=16 workers, (B=2, W=7, lambda=3): on the worst case the model allows (3 workers slowed 5x for 2 rounds "
    "every W-1+B=8 rounds, 300 rounds) and on 3 random bursty traces (lognormal(0, 0.02) noise, seeds 0-2), mu=0.1: "
    "SR-SGC (s = ceil(B lambda/(W-1+B)) = 1) decodes every job by its deadline t+B with no fallback round on the "
    "worst case, exactly (fractional-repetition decoding of each job's received tasks, error 0), at load 2/16 "
    "below the 4/16 GC needs to tolerate lambda=3 per round; GC at SR-SGC's load fails to decode every burst round "
    "(it waits for the stragglers) and its runtime per job is higher than SR-SGC's",
    weaker="synthetic delays; a round's compute time is taken proportional to the load",
    fast=True,
)
def srsgc_vs_gc() -> ClaimResult:
    import numpy as np

    from trainlab.distributed.gradient_coding import (
        bursty_delays,
        fractional_repetition_decode,
        simulate_gc,
        simulate_srsgc,
        srsgc_s,
        worst_case_bursts,
    )

    n, b, w, lam = 16, 2, 7, 3
    s = srsgc_s(b, w, lam)
    traces = {"worst case": worst_case_bursts(n, 300, b=b, w=w, lam=lam)}
    traces.update({f"seed {k}": bursty_delays(n, 300, b=b, w=w, lam=lam, seed=k) for k in range(3)})
    g = torch.Generator().manual_seed(0)
    partials = torch.randn(n // (s + 1), 8, generator=g, dtype=torch.float64).repeat_interleave(s + 1, dim=0)
    truth = partials[:: s + 1].sum(0)
    measured, baseline, error = {}, {}, 0.0
    for name, delays in traces.items():
        sr, gc_same, gc_lam = simulate_srsgc(delays, b, w, lam), simulate_gc(delays, s), simulate_gc(delays, lam)
        for got in sr.received:
            decoded = fractional_repetition_decode(partials, torch.from_numpy(~got), s)
            error = max(error, float((decoded - truth).abs().max()))
        measured[name] = {"runtime per job": round(sr.runtime / sr.jobs, 4), "fallback rounds": sr.fallback_rounds}
        baseline[name] = {
            "GC s=1 runtime per job": round(gc_same.runtime / gc_same.jobs, 4),
            "GC s=1 rounds not decoded in time": gc_same.fallback_rounds,
            "GC s=3 runtime per job": round(gc_lam.runtime / gc_lam.jobs, 4),
        }
    worst = measured["worst case"]
    passed = (
        worst["fallback rounds"] == 0
        and error == 0.0
        and baseline["worst case"]["GC s=1 rounds not decoded in time"] > 0
        and all(measured[k]["runtime per job"] < baseline[k]["GC s=1 runtime per job"] for k in traces)
        and sr.load < simulate_gc(np.ones((n, 1)), lam).load
    )
    return ClaimResult(
        measured={"s": s, "load": sr.load, **measured},
        baseline={"GC s=1 load": gc_same.load, "GC s=3 load": gc_lam.load, **baseline},
        passed=passed,
        note=f"every SR-SGC job decoded by round t+B (a miss raises); max decoding error {error:.1e}",
    )
