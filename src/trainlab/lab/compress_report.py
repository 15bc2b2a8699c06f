"""What a compression run writes for people: results.json's shape, report.md and the metric-vs-sparsity plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PER_SPARSITY = ("sparsity", "achieved_sparsity", "dense_layers", "metric_after", "file_bytes_after", "levels")


def results_json(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict: the shared keys once; ``sparsity``, ``metric_after``, ``file_bytes_after`` and ``levels`` are
    scalars (dict for levels) for one sparsity and lists aligned with ``sparsity`` for several; ``runs`` always
    lists the per-sparsity records."""
    out = {k: v for k, v in records[0].items() if k not in PER_SPARSITY}
    for key in PER_SPARSITY:
        values = [r[key] for r in records]
        out[key] = values[0] if len(records) == 1 else values
    out["runs"] = records
    return out


def pruning_report(records: list[dict[str, Any]]) -> str:
    r0 = records[0]
    lines = [
        f"# trainlab compress: {r0['workload']}, {r0['method']}"
        + (f" ({r0['allocator']} allocator)" if r0["method"] == "magnitude" else "")
        + (f", recovered with {r0['recover']}" if r0["recover"] else ""),
        "",
        f"| sparsity | achieved | {r0['metric']} before | {r0['metric']} after | file bytes before "
        "| file bytes after | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['sparsity']:g} | {r['achieved_sparsity']:.4f} | {r['metric_before']:.4f} | {r['metric_after']:.4f} "
            f"| {r['file_bytes_before']} | {r['file_bytes_after']} "
            f"| {r['file_bytes_after'] / r['file_bytes_before']:.3f} |"
        )
        if r["dense_layers"]:
            dense = "; ".join(f"`{k}` ({why})" for k, why in r["dense_layers"].items())
            lines.append(f"\nLeft dense at sparsity {r['sparsity']:g}: {dense}\n")
    lines += [
        "",
        "Sparsity is the fraction of Linear/Conv weights asked to be removed, achieved the fraction really removed "
        "(N:M leaves layers whose input size is not a multiple of M dense; embeddings, norms and biases stay "
        "dense); file "
        "bytes are the safetensors exports (compact sparse encoding, or the sliced model for structured methods).",
        "",
        "Per-layer levels (sparsity per layer; output channels for structured methods):",
        "",
    ]
    for r in records:
        lines.append(f"- sparsity {r['sparsity']:g}: " + ", ".join(f"`{k}` {v}" for k, v in r["levels"].items()))
    return "\n".join(lines) + "\n"


def quantization_report(r: dict[str, Any]) -> str:
    ratio = r["file_bytes_after"] / r["file_bytes_before"]
    lines = [
        f"# trainlab compress: {r['workload']}, {r['method']} at {r['bits']:g} bits ({r['allocator']} allocator"
        + (", second-order compensation)" if r["second_order"] else ")"),
        "",
        f"| bits | {r['metric']} before | {r['metric']} after | file bytes before | file bytes after | ratio |",
        "|---|---|---|---|---|---|",
        f"| {r['bits']:g} (mean {r['mean_bits']:g}) | {r['metric_before']:.4f} | {r['metric_after']:.4f} "
        f"| {r['file_bytes_before']} | {r['file_bytes_after']} | {ratio:.3f} |",
        "",
        "Every Linear/Conv weight is quantized (embeddings, norms and biases stay float32); the file after is the "
        "packed safetensors export (codes, float16 scales, ...), the file before the float32 one.",
        "",
        "Bits per layer: " + ", ".join(f"`{k}` {v}" for k, v in r["levels"].items()),
    ]
    return "\n".join(lines) + "\n"


def plot_metric_vs_sparsity(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["sparsity"] for r in records]
    ax.plot(xs, [r["metric_after"] for r in records], marker="o", label=records[0]["method"])
    ax.axhline(records[0]["metric_before"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(records[0]["metric"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
