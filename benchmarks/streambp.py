"""Time and peak memory of one training step (forward + backward) with StreamBP vs standard backprop.

The model is the ``pylm`` workload's ``ByteTransformer`` (default size: d=128, 2 layers, 4 heads, 256 bytes)
with its context stretched to each length. Each (method, context) runs in a fresh subprocess, so peak resident
memory is not blurred by what the allocator cached for an earlier run. Reported per step:

- median wall time of ``--repeats`` steps after the first full-length one;
- peak bytes of tensors saved for backward (`trainlab.memory.SavedTensorMeter`, parameters excluded);
- peak RSS of the first full-length step (after a warm-up step on a short sequence) above the RSS just
  before it (Linux VmHWM), which also counts gradients, transient buffers and allocator slack.

    python benchmarks/streambp.py --threads 1 --out benchmarks/results/streambp.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import publish  # benchmarks/report.py (the script directory is on sys.path)

from trainlab.lab.memory import peak_rss_bytes, reset_peak_rss
from trainlab.lab.workloads.pylm import ByteTransformer, lm_loss
from trainlab.memory import SavedTensorMeter, streambp_backward

METHODS = ("standard", "streambp")
WARMUP_LENGTH = 48


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def measure(method: str, context: int, batch: int, repeats: int) -> dict[str, float]:
    """One (method, context) cell, measured in this process."""
    torch.manual_seed(0)
    model = ByteTransformer(context=context)
    g = torch.Generator().manual_seed(0)

    def step(length: int) -> None:
        tokens, targets = (torch.randint(0, 256, (batch, length), generator=g) for _ in range(2))
        model.zero_grad(set_to_none=True)
        if method == "standard":
            lm_loss(model, (tokens, targets)).backward()
        else:
            streambp_backward(model, tokens, targets)

    step(WARMUP_LENGTH)  # one-time kernel and allocator set-up, at a length too short to cache much memory
    # RSS at the first full-length step: later steps reuse memory the allocator kept, which hides their peak.
    before = _rss_bytes()
    rss_ok = reset_peak_rss()
    step(context)
    rss_delta = peak_rss_bytes() - before if rss_ok else float("nan")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(context)
        times.append(time.perf_counter() - t0)
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        step(context)
    return {"time_s": statistics.median(times), "saved_peak_bytes": meter.peak_bytes, "rss_delta_bytes": rss_delta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        method, context = args.worker
        print(json.dumps(measure(method, int(context), args.batch, args.repeats)))
        return

    mib = 2**20
    lines = [
        f"StreamBP vs standard backprop, pylm ByteTransformer (d128, 2 layers), batch {args.batch}, "
        f"{args.threads} thread(s); StreamBP chunk = ceil(T/3), logits chunk = 100.",
        "",
        "| context | std time (s) | StreamBP time (s) | time ratio | std saved peak (MiB) | StreamBP saved peak "
        "(MiB) | saved ratio | std RSS delta (MiB) | StreamBP RSS delta (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for context in args.contexts:
        cell = {}
        for method in METHODS:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                str(context),
                "--batch",
                str(args.batch),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            cell[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        std, sbp = cell["standard"], cell["streambp"]
        lines.append(
            f"| {context} | {std['time_s']:.3f} | {sbp['time_s']:.3f} | {sbp['time_s'] / std['time_s']:.2f} | "
            f"{std['saved_peak_bytes'] / mib:.1f} | {sbp['saved_peak_bytes'] / mib:.1f} | "
            f"{std['saved_peak_bytes'] / sbp['saved_peak_bytes']:.2f} | {std['rss_delta_bytes'] / mib:.1f} | "
            f"{sbp['rss_delta_bytes'] / mib:.1f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    publish(table, args.out)


if __name__ == "__main__":
    main()
