"""Generate docs/methods.md from the registries, so the table cannot drift from the code.

It reads the method registries and the claims, so it lives with the claims (above the lab and the methods).
One :class:`Section` per pillar: a title, its columns and a function listing ``(name, *cells)`` rows from the
pillar's registry; the claims column is added from the claims registry. A new pillar adds one line to
``SECTIONS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from trainlab.claims.registry import Claim, all_claims
from trainlab.runtime import atomic_path

Row = tuple[str, ...]  # (method name, *cells); the name is what claims name as their ``method``


@dataclass(frozen=True)
class Section:
    title: str
    columns: tuple[str, ...]  # between "name" and "claims"
    rows: Callable[[], Iterable[Row]]


def optimizer_rows() -> Iterable[Row]:
    from trainlab.optim import get_spec, optimizer_names

    for name in optimizer_names():
        spec = get_spec(name)
        yield name, spec.paper, spec.summary, ", ".join(f"`{k}={v!r}`" for k, v in spec.defaults.items())


# Methods outside the compression registry (training-time N:M, recovery after pruning): their papers.
_NM_TRAINING_PAPERS = {
    "ste": "Estimating or Propagating Gradients Through Stochastic Neurons for Conditional Computation (STE)",
    "sr-ste": "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch (SR-STE)",
    "mdgf": "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers",
    "sdgf": "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers",
}
_RECOVERY_PAPERS = {"perp": "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs"}


def compression_rows() -> Iterable[Row]:
    from trainlab.compress import recover, sparse_training
    from trainlab.compress.registry import allocator_specs, compressor_names, get_compressor

    for name in compressor_names():
        spec = get_compressor(name)
        needs = ", ".join(sorted(spec.needs))
        if spec.second_order == "optional":
            needs += " (+ hessian with second order)" if needs else "hessian with second order"
        level = spec.level.replace("_", " ") + (f" {', '.join(map(str, spec.bits))}" if spec.bits else "")
        yield name, f"compressor ({spec.kind})", spec.paper, spec.summary, level, needs or "-"
    for spec in allocator_specs():
        budget = "per-column bits" if spec.per_column else spec.budget
        yield spec.name, "allocator", spec.paper, spec.summary, budget, ", ".join(sorted(spec.needs)) or "-"
    for r in recover.METHODS:
        yield r, "recovery (`--recover`)", _RECOVERY_PAPERS[r], "retraining after pruning", "-", "training data"
    for m in sparse_training.METHODS:
        yield m, "N:M sparse training", _NM_TRAINING_PAPERS[m], "`NMSchedule(method=...)`", "pattern", "training"


def localtrain_rows() -> Iterable[Row]:
    from trainlab import localtrain

    for name in localtrain.method_names():
        spec = localtrain.get_spec(name)
        yield name, spec.paper, spec.summary, spec.supports, ", ".join(f"`{k}={v!r}`" for k, v in spec.defaults.items())


def adapter_rows() -> Iterable[Row]:
    from trainlab.adapters import adapter_names, get_spec

    for name in adapter_names():
        spec = get_spec(name)
        needs = [f"prepare ({spec.prepare})"] if spec.prepare else []
        needs += ["training callback"] if spec.callback else []
        defaults = ", ".join(f"`{k}={f.default!r}`" for k, f in spec.fields.items())
        layers = ", ".join(spec.layer_types)
        yield name, spec.paper, spec.summary, layers, defaults, ", ".join(needs) or "-", spec.peft or "-"


def federated_rows() -> Iterable[Row]:
    from trainlab import federated

    for name in federated.strategy_names():
        spec = federated.get_spec(name)
        yield name, spec.kind, spec.paper, spec.summary, ", ".join(f"`{k}={v!r}`" for k, v in spec.defaults.items())


def batch_method_rows() -> Iterable[Row]:
    from trainlab.schedules import batch_method_names, get_batch_method

    for name in batch_method_names():
        spec = get_batch_method(name)
        defaults = ", ".join(f"`{k}={v!r}`" for k, v in spec.defaults.items())
        yield name, spec.paper, f"{spec.summary} (`{spec.entry}`)", defaults


def distributed_rows() -> Iterable[Row]:
    from trainlab.distributed import comm_specs

    for spec in comm_specs():
        defaults = ", ".join(f"`{k}={v!r}`" for k, v in spec.defaults.items()) or "-"
        yield spec.name, spec.kind, spec.paper, spec.summary, defaults


SECTIONS = (
    Section("Optimizers", ("paper", "what it is", "defaults"), optimizer_rows),
    Section("Batch size", ("paper", "what it is", "defaults"), batch_method_rows),
    Section("Compression", ("kind", "paper", "what it is", "level / budget", "needs"), compression_rows),
    Section("Training without backpropagation", ("paper", "what it is", "model", "defaults"), localtrain_rows),
    Section("Adapters", ("paper", "what it is", "layers", "defaults", "needs", "PEFT export"), adapter_rows),
    Section("Distributed communication", ("kind", "paper", "what it is", "defaults"), distributed_rows),
    Section("Federated learning", ("kind", "paper", "what it is", "defaults"), federated_rows),
)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [f"| {' | '.join(r)} |" for r in rows]


def _section(section: Section, claims: list[Claim]) -> list[str]:
    def row(name: str, *cells: str) -> list[str]:
        own = ", ".join(f"`{c.name}`" for c in claims if c.method == name) or "-"
        return [f"`{name}`", *cells, own]

    return [
        "",
        f"## {section.title}",
        "",
        *_table(("name", *section.columns, "claims"), (row(*r) for r in section.rows())),
    ]


def render_methods_table() -> str:
    from trainlab.lab.workloads import get_workload, workload_names

    claims = all_claims()
    lines = [
        "# Methods",
        "",
        "Generated by `trainlab docs`; do not edit by hand. `trainlab verify` measures every claim.",
    ]
    for section in SECTIONS:
        lines += _section(section, claims)
    lines += ["", "## Claims", ""]
    lines += _table(
        ("claim", "method", "paper", "promise", "fast"),
        ([f"`{c.name}`", c.method, c.paper, c.promise, "yes" if c.fast else "no"] for c in claims),
    )
    lines += ["", "## Workloads", ""]
    rows = []
    for name in workload_names():
        w = get_workload(name)
        better = "higher" if w.higher_is_better else "lower"
        rows.append(
            [
                f"`{name}`",
                w.description,
                f"{w.metric} ({better} is better)",
                str(w.target),
                str(w.steps),
                str(w.batch_size),
            ]
        )
    lines += _table(("name", "description", "metric", "target", "steps", "batch"), rows)
    return "\n".join(lines) + "\n"


def write_methods_table(path: Path) -> Path:
    """Write the table to ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    text = render_methods_table()
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
