"""Claim of StreamBP: exact gradients with less activation memory."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.lab.memory import peak_rss_bytes, reset_peak_rss
from trainlab.lab.workloads.pylm import ByteTransformer, lm_loss
from trainlab.memory import SavedTensorMeter, streambp_backward

PAPER = "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence Training of LLMs"
CONTEXT = 1024
BATCH = 4
TOLERANCE = 1e-6  # float32: the loss and every gradient entry
MIB = 2**20


def _model_and_batch() -> tuple[ByteTransformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ByteTransformer(context=CONTEXT)  # the pylm model at its default size, context stretched
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, 256, (BATCH, CONTEXT), generator=g) for _ in range(2))
    return model, tokens, targets


def _step(method: str, model: ByteTransformer, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    if method == "streambp":
        return streambp_backward(model, tokens, targets).item()
    loss = lm_loss(model, (tokens, targets))
    loss.backward()
    return loss.item()


def peak_rss_delta_mib(method: str) -> None:
    """Print the peak RSS growth (MiB) of one ``method`` step; run in a fresh process, where the allocator
    has no memory cached from other steps. A warm-up on 48 positions does the one-time set-up first."""
    torch.set_num_threads(1)
    model, tokens, targets = _model_and_batch()
    _step(method, model, tokens[:, :48], targets[:, :48])
    before = peak_rss_bytes() if reset_peak_rss() else None
    _step(method, model, tokens, targets)
    print("nan" if before is None else (peak_rss_bytes() - before) / MIB)


def _rss_in_fresh_process(method: str) -> float:
    code = f"from trainlab.claims.streambp import peak_rss_delta_mib; peak_rss_delta_mib({method!r})"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return round(float(out), 1)


@register_claim(
    "streambp/exact-lower-memory",
    method="streambp",
    paper=PAPER,
    promise=f"on the pylm ByteTransformer at context {CONTEXT}, StreamBP gives standard backprop's loss and "
    f"gradients (float32, within {TOLERANCE}) with at most half its peak saved-activation bytes and a lower "
    "peak RSS",
    fast=True,
)
def streambp_exact_lower_memory() -> ClaimResult:
    model, tokens, targets = _model_and_batch()
    params = list(model.parameters())
    with SavedTensorMeter(exclude=params) as standard:
        std_loss = _step("standard", model, tokens, targets)
    std_grads = [p.grad.clone() for p in params]
    with SavedTensorMeter(exclude=params) as stream:
        loss = _step("streambp", model, tokens, targets)
    grad_diff = max((p.grad - g).abs().max().item() for p, g in zip(params, std_grads, strict=True))
    rss = {m: _rss_in_fresh_process(m) for m in ("standard", "streambp")}
    rss_lower = math.isnan(rss["standard"]) or rss["streambp"] < rss["standard"]  # NaN: no VmHWM reset here
    ratio = standard.peak_bytes / stream.peak_bytes
    return ClaimResult(
        measured={
            "loss": round(loss, 6),
            "|loss - standard loss|": abs(loss - std_loss),
            "max |grad - standard grad|": grad_diff,
            "peak saved-activation MiB": round(stream.peak_bytes / MIB, 2),
            "peak RSS delta MiB (fresh process)": rss["streambp"],
        },
        baseline={
            "loss": round(std_loss, 6),
            "peak saved-activation MiB": round(standard.peak_bytes / MIB, 2),
            "peak RSS delta MiB (fresh process)": rss["standard"],
        },
        passed=abs(loss - std_loss) <= TOLERANCE and grad_diff <= TOLERANCE and ratio >= 2 and rss_lower,
        note=f"batch {BATCH}, chunk ceil(T/3), logits chunk 100; saved-activation bytes {ratio:.2f}x lower",
    )
