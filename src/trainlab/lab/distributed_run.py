"""``trainlab bench --nproc N``: the bench under torch.distributed, one run per (workload, algorithm, compressor,
seed).

The launcher (``launch_bench``) starts ``torchrun`` (``torch.distributed.run``: ``--standalone`` on one machine, the
static rendezvous with ``--nnodes/--node-rank/--master-addr/--master-port`` across machines) with this module as
each rank's program. Every rank builds the same model (same seed), wraps it in DistributedDataParallel with the
chosen communication hook, and trains on its contiguous shard of each batch (the batch size is split over the
ranks, so DDP's average of the shard means is the full batch's mean). Rank 0 writes the bench's usual
``results.json``, ``report.md``, ``train-loss.csv`` and plots; the report adds a communication table: bytes this
rank sent per step next to the dense all-reduce, and the final metric and time to target per compressor. Every
rank ends with a barrier and ``destroy_process_group``.

Compressors are given as ``NAME[-FEEDBACK][:KEY=VALUE...]``: ``allreduce`` (plain DDP, no hook), ``identity``,
``topk``, ``sign``, ``count-sketch``, each optionally with ``-ef``, ``-ef21`` or ``-ef21-w`` error feedback, e.g.
``topk-ef21:ratio=0.01`` or ``topk-ef21-w:smoothness=[1.0,3.0]`` (one L_i per rank).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainlab.lab import local
from trainlab.lab.bench import BenchConfig, resolved_config, validate
from trainlab.lab.workloads import Workload
from trainlab.runtime import atomic_path, batch_generator

__all__ = ["CommChoice", "free_port", "launch_bench", "parse_compressors", "shard_batch", "torchrun_command"]

PLAIN = "allreduce"
_FEEDBACK_SUFFIXES = ("ef21-w", "ef21", "ef")  # longest first: "topk-ef21-w" ends with "-w", not "-ef21"
_FEEDBACK_KEYS = ("smoothness", "init")


@dataclass(frozen=True)
class CommChoice:
    """One way to communicate gradients: ``compressor`` None is plain DDP (no hook)."""

    label: str
    compressor: str | None = None
    feedback: str = "none"
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the compressor's (ratio)
    feedback_options: dict[str, Any] = field(default_factory=dict)  # smoothness, init


def parse_compressors(specs: Sequence[str], world_size: int | None = None) -> list[CommChoice]:
    """``["allreduce", "topk-ef21:ratio=0.05"]`` -> CommChoices; each string may list several specs separated by
    commas outside brackets (``"allreduce,topk-ef21-w:smoothness=[1,3]"``). Every name and value is checked here
    (ValueError), before anything launches."""
    from trainlab.distributed import create_compressor
    from trainlab.distributed.registry import comm_specs

    compressors = [s.name for s in comm_specs() if s.kind == "compressor"]
    names = [n for spec in specs for n in _split_top_level(spec)]
    choices = []
    for spec in (n.strip() for n in names):
        head, *pairs = spec.split(":")
        if head == PLAIN:
            if pairs:
                raise ValueError(f"--compressor {spec}: '{PLAIN}' (plain DDP) takes no options")
            choices.append(CommChoice(PLAIN))
            continue
        name, feedback = head, "none"
        for suffix in _FEEDBACK_SUFFIXES:
            if head.endswith("-" + suffix) and head[: -len(suffix) - 1] in compressors:
                name, feedback = head[: -len(suffix) - 1], suffix
                break
        if name not in compressors:
            raise ValueError(
                f"--compressor {spec}: unknown compressor {name!r}; choose {PLAIN} or one of {', '.join(compressors)}, "
                "optionally followed by -ef, -ef21 or -ef21-w, then :KEY=VALUE options"
            )
        options: dict[str, Any] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"--compressor {spec}: options are KEY=VALUE, got {pair!r}")
            try:
                options[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                options[key] = raw
        fb = {k: options.pop(k) for k in _FEEDBACK_KEYS if k in options}
        try:
            create_compressor(name, **options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--compressor {spec}: {err}") from None
        if (feedback == "ef21-w") != ("smoothness" in fb):
            raise ValueError(
                f"--compressor {spec}: smoothness=[L_0, ...] (one per rank) goes with -ef21-w, and only there"
            )
        if "smoothness" in fb:
            smooth = fb["smoothness"]
            if not isinstance(smooth, list | tuple) or (world_size is not None and len(smooth) != world_size):
                raise ValueError(
                    f"--compressor {spec}: smoothness must list one L_i per rank ({world_size}), got {smooth!r}"
                )
            fb["smoothness"] = [float(v) for v in smooth]
        if "init" in fb and feedback not in ("ef21", "ef21-w"):
            raise ValueError(f"--compressor {spec}: init applies to -ef21 and -ef21-w")
        choices.append(CommChoice(spec, name, feedback, options, fb))
    labels = [c.label for c in choices]
    if not choices or len(set(labels)) != len(labels):
        raise ValueError(f"--compressor needs distinct compressors, got {labels}")
    return choices


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside [], () and {}."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[({") - (ch in "])}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def free_port() -> int:
    """A TCP port free on this machine now (for ``--master-port`` on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(
    config_file: Path,
    nproc: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The torchrun command line that runs this module's worker on ``config_file``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes == 1 and master_addr is None:
        cmd.append("--standalone")
    else:
        if master_addr is None or master_port is None:
            raise ValueError("--nnodes > 1 needs --master-addr and --master-port (the same on every node)")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
        cmd += ["--master-addr", master_addr, "--master-port", str(master_port)]
    return [*cmd, "-m", __name__, str(config_file)]


def launch_bench(
    config: BenchConfig,
    *,
    nproc: int,
    compressors: Sequence[str] = (PLAIN,),
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    imports: Sequence[str] = (),
    timeout_s: float | None = None,
) -> list[dict[str, Any]] | None:
    """Run the bench ``config`` on ``nproc`` processes per node; node 0 returns the results (rank 0 wrote them
    into ``config.out``), other nodes None. Raises RuntimeError when torchrun fails."""
    from trainlab.lab.bench_files import prepare_out

    for name, value, low in (("nproc", nproc, 1), ("nnodes", nnodes, 1), ("node_rank", node_rank, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if node_rank >= nnodes:
        raise ValueError(f"node_rank must be < nnodes={nnodes}, got {node_rank}")
    if config.resume:
        raise ValueError("--resume is not supported with --nproc (the ranks keep no checkpoints)")
    world = nproc * nnodes
    choices = parse_compressors(compressors, world)
    for algorithm in config.algorithms:
        if local.is_local(algorithm):
            raise ValueError(f"--nproc trains with an optimizer under DDP; {algorithm!r} is a local method")
    workloads = validate(config)
    for w in workloads:  # one batch drawn here (the runner draws it too) shows whether it can be split
        shard_batch(w.make_batch(w.batch_size, batch_generator(0, 0)), 0, world, w.name)
    out = Path(config.out)
    setup = {"config": config, "choices": choices, "imports": list(imports), "origin": None}
    if node_rank == 0:
        record = {**resolved_config(config, workloads), "nproc": nproc, "nnodes": nnodes,
                  "compressors": [c.label for c in choices]}  # fmt: skip
        setup["origin"] = prepare_out(out, record, config.overwrite)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning
    if master_addr in (None, "127.0.0.1", "localhost"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo on loopback, whatever the hostname says
    with tempfile.TemporaryDirectory(prefix="trainlab-nproc-") as tmp:
        config_file = Path(tmp) / "setup.pkl"
        config_file.write_bytes(pickle.dumps(setup))
        cmd = torchrun_command(config_file, nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                               master_port=master_port)  # fmt: skip
        proc = subprocess.Popen(cmd, env=env)
        try:
            code = proc.wait(timeout=timeout_s)
        except BaseException:  # timeout, Ctrl-C: torchrun stops its workers on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        raise RuntimeError(f"torchrun exited with status {code} (the failing rank's error is above): {' '.join(cmd)}")
    return json.loads((out / "results.json").read_text()) if node_rank == 0 else None


# ---------------------------------------------------------------------------------------------------------- worker


class _Ranked:
    """A workload as one rank sees it: DDP around the model (with the hook), its shard of each batch."""

    def __init__(self, workload: Workload, choice: CommChoice, seed: int) -> None:
        import torch.distributed as dist

        self.inner, self.choice, self.seed = workload, choice, seed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.models: list[Any] = []
        self.hooks: list[Any] = []
        self.workload = dataclasses.replace(
            workload, make_model=self.make_model, make_batch=self.make_batch, evaluate=self.evaluate
        )

    def make_model(self) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        from trainlab.distributed import register_compression_hook

        ddp = DistributedDataParallel(self.inner.make_model())
        c = self.choice
        hook = None
        if c.compressor is not None:
            hook = register_compression_hook(ddp, c.compressor, feedback=c.feedback, seed=self.seed,
                                             **c.feedback_options, **c.hyperparameters)  # fmt: skip
        self.models.append(ddp)
        self.hooks.append(hook)
        return ddp

    def make_batch(self, batch_size: int, generator: torch.Generator) -> Any:
        return shard_batch(self.inner.make_batch(batch_size, generator), self.rank, self.world, self.inner.name)

    def evaluate(self, model: torch.nn.Module) -> float:
        return self.inner.evaluate(getattr(model, "module", model))


def shard_batch(batch: Any, rank: int, world: int, name: str = "batch") -> Any:
    """Rank ``rank``'s contiguous 1/``world`` of a batch (a tensor, or a tuple/list of tensors of one length)."""
    parts = batch if isinstance(batch, tuple | list) else (batch,)
    if not all(isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == parts[0].shape[0] for t in parts):
        raise ValueError(
            f"{name}: --nproc splits batches of tensors along dim 0 over the ranks; this one is a "
            f"{type(batch).__name__}"
        )
    n = parts[0].shape[0]
    if n % world:
        raise ValueError(f"{name}: a batch of {n} does not split over {world} ranks")
    shard = [t[rank * n // world : (rank + 1) * n // world] for t in parts]
    return type(batch)(shard) if isinstance(batch, tuple | list) else shard[0]


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _in_sync(flat: torch.Tensor) -> bool:
    """Whether every rank holds bitwise rank 0's parameters (one broadcast and one all-reduce)."""
    import torch.distributed as dist

    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([int(torch.equal(ref, flat))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def _communication(ranked: _Ranked) -> dict[str, Any]:
    model, hook = ranked.models[0], ranked.hooks[0]
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    if hook is None:
        sent, per_step_dense = dense, dense
    else:
        done = max(hook.steps.values(), default=0) or 1
        sent, per_step_dense = hook.bytes_sent / done, hook.dense_bytes / done
    flat = _flat_params(model)
    return {
        "bytes_sent_per_step": sent,
        "dense_bytes_per_step": per_step_dense,
        "weights_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "ranks_in_sync": _in_sync(flat),
    }


class _RelabelledLog:
    def __init__(self, log: Any, label: str) -> None:
        self.log, self.label = log, label

    def add(self, workload: str, algorithm: str, seed: int, losses: Sequence[float]) -> None:
        if self.log is not None:
            self.log.add(workload, self.label, seed, losses)


def _worker(setup: dict[str, Any]) -> None:
    import torch.distributed as dist

    from trainlab.lab.bench import _run_one
    from trainlab.lab.bench_files import TrainLossLog, plot_train_losses
    from trainlab.lab.plots import write_plots
    from trainlab.lab.report import write_report

    config: BenchConfig = dataclasses.replace(setup["config"], checkpoint_every=0, resume=False)
    choices: list[CommChoice] = setup["choices"]
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(config.out)
    workloads = validate(config) if rank == 0 else [_workload(n) for n in config.workloads]
    log = TrainLossLog(out) if rank == 0 else None
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=f"trainlab-rank{rank}-") as scratch:  # the runner's checkpoints
        for w in workloads:
            for algorithm in config.algorithms:
                for choice in choices:
                    label = f"{algorithm}+{choice.label}"
                    for seed in range(config.seeds):
                        ranked = _Ranked(w, choice, seed)
                        record = _run_one(config, ranked.workload, algorithm, seed, Path(scratch) / label,
                                          lambda _n: None, None, _RelabelledLog(log, label))  # fmt: skip
                        comm = _communication(ranked)
                        if rank != 0:
                            continue
                        if config.progress:
                            print(f"{w.name} {label} seed {seed}: {record['final_metric']}", file=sys.stderr)
                        for key in ("samples", "samples_to_target"):  # every rank drew its shard
                            if record[key] is not None:
                                record[key] *= world
                        record.update(algorithm=label, optimizer=algorithm, compressor=choice.label, nproc=world,
                                      **comm)  # fmt: skip
                        results.append({**record, "provenance": setup["origin"]})
                        with atomic_path(out / "results.json") as tmp:
                            tmp.write_text(json.dumps(results, indent=1))
    if rank == 0:
        write_report(results, out / "report.md")
        with (out / "report.md").open("a") as f:
            f.write(render_communication(results))
        write_plots(results, out)
        plot_train_losses(log.path, out)


def _workload(name: str) -> Workload:
    from trainlab.lab.workloads import get_workload

    return get_workload(name)


def render_communication(results: Sequence[dict[str, Any]]) -> str:
    """The report's section for distributed runs: one row per (workload, optimizer, compressor), medians over
    seeds: this rank's bytes per step vs the dense all-reduce, final metric, time to target, step time."""
    import statistics

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["workload"], r["optimizer"], r["compressor"]), []).append(r)
    nproc = results[0]["nproc"] if results else 0
    lines = [
        f"## Communication ({nproc} processes, DDP)",
        "",
        "Bytes one rank sends per step (its payload per collective, summed over buckets) next to the dense "
        "all-reduce; the speed-accuracy trade-off per compressor. Medians over seeds.",
        "",
        "| workload | optimizer | compressor | bytes/step | vs dense | final | reached | time to target (s) "
        "| step (ms) | ranks in sync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def med(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for (w, opt, comp), runs in sorted(groups.items()):
        sent, dense = med(runs, "bytes_sent_per_step"), med(runs, "dense_bytes_per_step")
        reached = sum(r["steps_to_target"] is not None for r in runs)
        lines.append(
            f"| {w} | {opt} | {comp} | {fmt(sent, ',.0f')} | {fmt(sent / dense if sent and dense else None, '.4f')}"
            f" | {fmt(med(runs, 'final_metric'), '.4f')} | {reached}/{len(runs)}"
            f" | {fmt(med(runs, 'time_to_target_s'), '.2f')} | {fmt(med(runs, 'step_time_ms_median'), '.2f')}"
            f" | {all(r['ranks_in_sync'] for r in runs)} |"
        )
    return "\n" + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Each rank's program (torchrun starts it): ``python -m trainlab.lab.distributed_run SETUP.pkl``."""
    import torch.distributed as dist

    argv = list(sys.argv[1:] if argv is None else argv)
    setup = pickle.loads(Path(argv[0]).read_bytes())
    _load_workload_modules(setup["imports"])
    dist.init_process_group("gloo")
    try:
        _worker(setup)
        dist.barrier()  # only on success: a failed rank exits at once, and torchrun stops the others
    finally:
        dist.destroy_process_group()
    return 0


def _load_workload_modules(imports: Sequence[str]) -> None:
    """What the launcher loaded before validating: installed ``trainlab.workloads`` entry points and ``--import``
    modules (they register workloads)."""
    import importlib
    from importlib.metadata import entry_points

    for entry in entry_points(group="trainlab.workloads"):
        entry.load()
    for module in imports:
        importlib.import_module(module)


if __name__ == "__main__":
    sys.exit(main())
