"""Straggler-tolerant gradient coding, simulated on delay traces: gradient coding (GC), selective-repeat sequential
gradient coding (SR-SGC) and multiplexed sequential gradient coding (M-SGC) from "Sequential Gradient Coding for
Straggler Mitigation" (Krishnan et al., ICLR 2023).

A master runs rounds; in each, worker i takes ``load * delays[i, round]`` (compute proportional to its normalized
load). The master waits until ``(1 + mu)`` times the fastest worker; slower workers are stragglers. When a round's
stragglers break the scheme's straggler model, the master waits for everyone instead (the round takes the slowest
worker's time) - ``fallback_rounds`` counts those rounds, which the official simulator leaves silent.

GC (fractional repetition, s stragglers per round, load (s+1)/n) decodes every job in its own round. M-SGC splits
each job into W-1+B minitasks done over consecutive rounds (W-1 "D1" minitasks by repetition, B "D2" minitasks
coded across workers), tolerates (B, W, lambda)-bursty stragglers and finishes job t at round t+W-2+B, with load
(lambda+1)(W-1+B) / (n (B + (W-1)(lambda+1))). The scheduling and decoding rules follow the authors' simulator
(mamaj/Sequential-Gradient-Coding); two of its slips are not copied: GC there decodes only with fewer than s
stragglers (it tolerates s), and M-SGC's model check indexes negative rounds early on (wrapping to the end).

SR-SGC runs an (n, s) GC code with s = ceil(B lambda / (W - 1 + B)) < lambda, at GC's load (s+1)/n for that s, and
delay T = B: job t's tasks go out in round t; if v > s of them are missing, v - s of the missing workers redo their
job-t task in round t+B instead of their current one, and job t decodes from any n - s distinct task results. A
worker that redoes an old task does not return its current job's task, so it counts as missing for that job too
(the authors' simulator counts only stragglers there, and its decodability check can then fail); stragglers of
round t are picked to redo first, since a burst of at most B rounds has ended by round t+B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SimulationResult",
    "bursty_delays",
    "fractional_repetition_decode",
    "gc_load",
    "msgc_load",
    "simulate_gc",
    "simulate_msgc",
    "simulate_srsgc",
    "srsgc_s",
    "worst_case_bursts",
]

_STRAGGLED = -1


@dataclass(frozen=True)
class SimulationResult:
    load: float
    durations: np.ndarray  # seconds per round
    jobs: int
    decodable: bool
    fallback_rounds: int  # rounds that broke the straggler model: the master waited for every worker
    # SR-SGC: (jobs, n) whether worker i's task of job t reached the master (in round t or t+B)
    received: np.ndarray | None = None

    @property
    def runtime(self) -> float:
        return float(self.durations.sum())


def gc_load(n: int, s: int) -> float:
    return (s + 1) / n


def msgc_load(n: int, b: int, w: int, lam: int) -> float:
    return (lam + 1) * (w - 1 + b) / (n * (b + (w - 1) * (lam + 1)))


def srsgc_s(b: int, w: int, lam: int) -> int:
    """The stragglers per round SR-SGC's GC code tolerates: ceil(B lambda / (W - 1 + B))."""
    return -(-b * lam // (w - 1 + b))


def _check(n: int, **ints: int) -> None:
    for name, v in {"n": n, **ints}.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name in ("s", "lam") else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name in ('s', 'lam') else 'positive'} int, got {v!r}"
            )


def _stragglers(delays: np.ndarray, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """Per round: who exceeds (1 + mu) times the fastest, and that waiting time."""
    wait = delays.min(axis=0) * (1 + mu)
    return delays > wait, wait


def bursty_delays(
    n: int, rounds: int, *, b: int, w: int, lam: int, slowdown: float = 5.0, sigma: float = 0.02, seed: int = 0
) -> np.ndarray:
    """(n, rounds) delays: lognormal(0, sigma) per worker and round, times ``slowdown`` in bursts of at most ``b``
    rounds by at most ``lam`` distinct workers in any ``w`` consecutive rounds (a burst starts when the window allows
    one, with probability 1/2)."""
    rng = np.random.default_rng(seed)
    delays = rng.lognormal(0.0, sigma, size=(n, rounds))
    slow = np.zeros((n, rounds), dtype=bool)
    r = 0
    while r < rounds:
        recent = slow[:, max(0, r - w + 1) : r].any(axis=1)
        if rng.random() < 0.5 and recent.sum() < lam:
            worker = rng.choice(np.flatnonzero(~recent))
            length = int(rng.integers(1, b + 1))
            slow[worker, r : r + length] = True
            r += w  # leave the next window free so bursts never pile up past the model
        else:
            r += 1
    return np.where(slow, delays * slowdown, delays)


def worst_case_bursts(n: int, rounds: int, *, b: int, w: int, lam: int, slowdown: float = 5.0) -> np.ndarray:
    """(n, rounds) delays: 1, and ``slowdown`` for ``lam`` workers at once in bursts of ``b`` rounds every
    W - 1 + B rounds (the worker set rotates): the most stragglers a (B, W, lambda)-bursty model allows in a round,
    as often as it allows them."""
    _check(n, b=b, w=w, lam=lam)
    delays = np.ones((n, rounds))
    period = w - 1 + b
    for k, start in enumerate(range(0, rounds, period)):
        workers = (np.arange(lam) + k * lam) % n
        delays[np.ix_(workers, np.arange(start, min(start + b, rounds)))] = slowdown
    return delays


def simulate_gc(delays: np.ndarray, s: int, mu: float = 0.1) -> SimulationResult:
    """Gradient coding tolerating ``s`` stragglers per round over ``delays`` (workers, rounds)."""
    n, rounds = delays.shape
    _check(n, s=s)
    load = gc_load(n, s)
    straggler, wait = _stragglers(delays, mu)
    fallback = straggler.sum(axis=0) > s
    durations = load * np.where(fallback, delays.max(axis=0), wait)
    # Every round either has <= s stragglers (decodable) or waited for all.
    return SimulationResult(load, durations, rounds, True, int(fallback.sum()))


def _follows_bursty_model(state: np.ndarray, r: int, straggler: np.ndarray, b: int, w: int, lam: int) -> bool:
    """At most ``lam`` distinct stragglers in the last ``w`` rounds (this one included), and no current straggler
    that also straggled in rounds [r-w+1, r-b] (bursts last at most ``b`` rounds)."""
    window = (state[:, max(0, r + 1 - w) : r] == _STRAGGLED).any(axis=1)
    if (window | straggler).sum() > lam:
        return False
    older = (state[:, max(0, r + 1 - w) : max(0, r + 1 - b)] == _STRAGGLED).any(axis=1)
    return not (older & straggler).any()


def simulate_msgc(delays: np.ndarray, b: int, w: int, lam: int, mu: float = 0.1) -> SimulationResult:
    """M-SGC for (b, w, lam)-bursty stragglers over ``delays`` (workers, rounds); the last W-2+B rounds only finish
    earlier jobs, so ``jobs`` is rounds - (W-2+B). Raises RuntimeError if a job cannot be decoded."""
    n, rounds = delays.shape
    _check(n, b=b, w=w, lam=lam)
    if not (w > b and lam < n):
        raise ValueError(f"M-SGC needs w > b and lam < n, got b={b}, w={w}, lam={lam}, n={n}")
    d1, minitasks = w - 1, w - 1 + b
    jobs = rounds - (minitasks - 1)
    if jobs < 1:
        raise ValueError(f"delays must cover more than W-2+B={minitasks - 1} rounds, got {rounds}")
    load = msgc_load(n, b, w, lam)
    # state[i, m, r]: token worker i returned for minitask slot m in round r (job r - m): 0 = a D1 minitask,
    # 1..B = D2 group, -1 = straggled, -2 = no job.
    state = np.full((n, minitasks, rounds), -2, dtype=np.int64)
    first = np.zeros((n, rounds), dtype=np.int64)  # -1 where a worker's straggling was applied (the model's history)
    straggler, wait = _stragglers(delays, mu)
    durations = np.empty(rounds)
    fallbacks = 0
    for r in range(rounds):
        result = np.full((n, minitasks), -2, dtype=np.int64)
        for m in range(minitasks):
            job = r - m
            if job < 0 or job >= jobs:
                continue
            if m < d1:
                result[:, m] = 0
            else:
                done_d1 = (_diagonal(state, job, m) == 0).sum(axis=1)
                result[:, m] = np.where(done_d1 >= d1, m - d1 + 1, 0)
        if _follows_bursty_model(first, r, straggler[:, r], b, w, lam):
            result[straggler[:, r]] = _STRAGGLED
            durations[r] = load * wait[r]
        else:
            fallbacks += 1
            durations[r] = load * delays[:, r].max()
        state[:, :, r] = result
        first[:, r] = np.where((result == _STRAGGLED).any(axis=1), _STRAGGLED, 0)
        job = r - (minitasks - 1)
        if job >= 0 and not _msgc_decodable(_diagonal(state, job, minitasks), d1, b, n, lam):
            raise RuntimeError(f"M-SGC: job {job} is not decodable at round {r}")
    return SimulationResult(load, durations, jobs, True, fallbacks)


def simulate_srsgc(delays: np.ndarray, b: int, w: int, lam: int, mu: float = 0.1) -> SimulationResult:
    """SR-SGC for (b, w, lam)-bursty stragglers over ``delays`` (workers, rounds): an (n, s) GC code with
    s = ``srsgc_s(b, w, lam)`` plus selective repeats B rounds later. Jobs are rounds - B; raises RuntimeError when
    a job cannot be decoded by its deadline (round t + B)."""
    n, rounds = delays.shape
    _check(n, b=b, w=w, lam=lam)
    if not (w > b and lam < n and (w - 1) % b == 0):
        raise ValueError(f"SR-SGC needs w > b, B | (W - 1) and lam < n, got b={b}, w={w}, lam={lam}, n={n}")
    s = srsgc_s(b, w, lam)
    jobs = rounds - b
    if jobs < 1:
        raise ValueError(f"delays must cover more than B={b} rounds, got {rounds}")
    load = gc_load(n, s)
    straggler, wait = _stragglers(delays, mu)
    history = np.zeros((n, rounds), dtype=np.int64)  # -1 where straggling was applied (the model's history)
    straggled = np.zeros((n, rounds), dtype=bool)
    received = np.zeros((jobs, n), dtype=bool)
    durations = np.empty(rounds)
    fallbacks = 0
    for r in range(rounds):
        task = np.full(n, r if r < jobs else -1)  # the job each worker works on this round (-1: none)
        old = r - b
        if old >= 0:
            missing = np.flatnonzero(~received[old])
            if missing.size > s:
                order = missing[np.argsort(~straggled[missing, old], kind="stable")]  # round-t stragglers first
                task[order[: missing.size - s]] = old
        if _follows_bursty_model(history, r, straggler[:, r], b, w, lam):
            slow = straggler[:, r]
            durations[r] = load * wait[r]
        else:
            fallbacks += 1
            slow = np.zeros(n, dtype=bool)
            durations[r] = load * delays[:, r].max()
        straggled[:, r] = slow
        history[:, r] = np.where(slow, _STRAGGLED, 0)
        for i in np.flatnonzero(~slow & (task >= 0)):
            received[task[i], i] = True
        if old >= 0 and received[old].sum() < n - s:
            raise RuntimeError(f"SR-SGC: job {old} is not decodable at round {r}")
    return SimulationResult(load, durations, jobs, True, fallbacks, received)


def _diagonal(state: np.ndarray, job: int, upto: int) -> np.ndarray:
    """(n, upto): what each worker returned for job ``job``'s first ``upto`` minitask slots (slot m in round job+m)."""
    return np.stack([state[:, m, job + m] for m in range(upto)], axis=1)


def _msgc_decodable(results: np.ndarray, d1: int, b: int, n: int, lam: int) -> bool:
    """Every worker finished its D1 minitasks, and each D2 group has at least n - lam coded results."""
    if ((results == 0).sum(axis=1) < d1).any():
        return False
    return all((results == g).sum() >= n - lam for g in range(1, b + 1))


def fractional_repetition_decode(partials: Tensor, straggler: Tensor, s: int) -> Tensor:
    """Gradient coding with a fractional-repetition code: the n workers form n/(s+1) groups; each group's s+1
    workers compute the same partition's gradient sum (``partials[i]`` is worker i's result). The master adds one
    returned result per group; with at most s stragglers every group has one. Returns the full gradient sum."""
    n = partials.shape[0]
    if n % (s + 1):
        raise ValueError(f"fractional repetition needs (s + 1) | n, got n={n}, s={s}")
    alive = (~straggler).view(n // (s + 1), s + 1)
    if not alive.any(dim=1).all():
        raise RuntimeError(f"a whole group straggled ({int(straggler.sum())} stragglers > s={s} somewhere)")
    pick = alive.float().argmax(dim=1) + torch.arange(0, n, s + 1)
    return partials[pick].sum(0)
