"""Step time and measured memory of the backprop-free methods against backprop, in the same process.

For each workload, backprop (the workload's model with AdamW at its tuned values) and every local method get
the same model (seed 0) and batches. Steps are timed in interleaved rounds (each method runs ``--steps`` steps
per round, ``--rounds`` rounds) so that a load change on a shared machine hits all of them alike; the median
step time and its ratio to backprop's are reported. Memory of one step, measured:

- activations held: peak bytes of tensors saved for backward (SavedTensorMeter, parameters excluded);
- peak tensor bytes: peak of every tensor the step allocates (PeakTensorMeter: activations, gradients,
  optimizer temporaries, population stacks), on any device.

Energy, measured (trainlab.lab.energy: RAPL package counters, NVML on a GPU) over each method's timed steps,
per step and per training sample, as "Beyond Backpropagation" reports it; ``n/a: <reason>`` where the machine
has no counter. The counters are the whole package's: other processes on a shared machine are counted too.

GBNN's step is one boosting stage on the whole training set (its total is 200 stages), so its ratio compares a
stage with a minibatch step.

    python benchmarks/localtrain.py --threads 1 --out benchmarks/results/localtrain.md
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from report import publish  # benchmarks/report.py (the script directory is on sys.path)

from trainlab.lab import local
from trainlab.lab.bench import resolve_hyperparameters
from trainlab.lab.energy import EnergyMeter
from trainlab.lab.workloads import get_workload
from trainlab.memory.allocations import PeakTensorMeter
from trainlab.runtime import batch_generator

GRID = {
    "digits-mlp": ["backprop", "mono-forward", "forward-forward", "noprop", "eggroll", "gbnn"],
    "mnist1d-mlp": ["backprop", "mono-forward", "forward-forward"],
    "sbm-gnn": ["backprop", "forward-gnn"],
}


def _stepper(workload, algorithm):
    hp = resolve_hyperparameters(algorithm, workload)
    torch.manual_seed(0)
    model = workload.make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FF's unused head, GBNN's replaced layers: documented
        trainer = local.make_trainer(workload, algorithm, hp, 0)(model)
    size = local.batch_size(workload, algorithm)
    if local.is_local(algorithm):
        return model, trainer, size, trainer.train_step

    def step(batch):
        trainer.zero_grad(set_to_none=True)
        workload.loss(model, batch).backward()
        trainer.step()

    return model, trainer, size, step


def _bench_workload(name: str, steps: int, rounds: int) -> list[str]:
    workload = get_workload(name)
    runs = {a: _stepper(workload, a) for a in GRID[name]}
    times: dict[str, list[float]] = {a: [] for a in runs}
    counter = {a: 0 for a in runs}
    joules: dict[str, list] = {a: [] for a in runs}  # (reading, steps, samples) per round
    for _ in range(rounds):
        for a, (_, _, size, step) in runs.items():
            n = 2 if a == "gbnn" else steps  # a stage fits the whole set: a few are enough to time it
            batches = [workload.make_batch(size, batch_generator(0, counter[a] + i)) for i in range(n)]
            counter[a] += n
            with EnergyMeter() as energy:
                for batch in batches:
                    t0 = time.perf_counter()
                    step(batch)
                    times[a].append(time.perf_counter() - t0)
            joules[a].append((energy.reading, n, sum(_rows(b) for b in batches)))
    lines = [
        f"### {name}",
        "",
        "| method | step (ms, median) | vs backprop | activations held (KB) | peak tensor bytes per step (KB) "
        "| energy per step (J) | energy per sample (J) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = statistics.median(times["backprop"])
    for a, (_, _, size, step) in runs.items():
        batch = workload.make_batch(size, batch_generator(0, counter[a]))
        hp = resolve_hyperparameters(a, workload)
        held = local.activation_peak_bytes(workload, a, hp, 0, batch)
        with PeakTensorMeter() as meter:
            step(batch)
        t = statistics.median(times[a])
        per_step, per_sample = _energy_cells(joules[a])
        lines.append(
            f"| {a} | {1e3 * t:.2f} | {t / base:.2f}x | {held / 1024:.1f} | {meter.peak_bytes / 1024:.1f} "
            f"| {per_step} | {per_sample} |"
        )
    return lines + [""]


def _rows(batch) -> int:
    """Training samples in a batch: labelled nodes of a graph, rows of an (x, y) pair."""
    labels = local.split_batch(batch)[1]
    return int((labels != -100).sum())


def _energy_cells(rounds: list) -> tuple[str, str]:
    """Median over rounds of joules per step and per sample, or ``n/a: <reason>`` from the meter."""
    measured = [(r.joules, n, s) for r, n, s in rounds if r.joules is not None]
    if not measured:
        reason = rounds[0][0].reason
        return f"n/a: {reason}", f"n/a: {reason}"
    per_step = statistics.median(j / n for j, n, _ in measured)
    per_sample = statistics.median(j / s for j, _, s in measured)
    return f"{per_step:.4g}", f"{per_sample:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        "## Backprop-free methods: step time and memory vs backprop",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; {args.rounds} interleaved rounds of "
        f"{args.steps} steps per method.",
        "",
    ]
    for name in GRID:
        lines += _bench_workload(name, args.steps, args.rounds)
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
