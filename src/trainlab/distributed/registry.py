"""Communication compressors and error-feedback schemes by name, and the front door for DDP.

``register_compression_hook(ddp_model, "topk", feedback="ef21", ratio=0.01)``. Each spec names its paper and its
hyperparameters: the defaults are the complete list of accepted keywords, each with an allowed range."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from trainlab.distributed.compressors import Compressor, CountSketch, Identity, ScaledSign, TopK
from trainlab.distributed.feedback import FEEDBACK
from trainlab.ranges import Between, Range, check_hyperparameters

__all__ = [
    "CommSpec",
    "comm_specs",
    "create_compressor",
    "register_compression_hook",
]


@dataclass(frozen=True)
class CommSpec:
    name: str
    kind: str  # "compressor" or "error feedback"
    paper: str
    summary: str
    defaults: Mapping[str, Any]
    ranges: Mapping[str, Range]
    factory: Callable[..., Compressor] | None = None


_RATIO = {"ratio": Between(1e-6, 1.0)}
_COMPRESSORS = {
    s.name: s
    for s in (
        CommSpec("identity", "compressor", "-", "no compression (plain all-reduce)", {}, {}, Identity),
        CommSpec(
            "topk",
            "compressor",
            "Sparsified SGD with Memory (Stich et al. 2018)",
            "largest-magnitude share per tensor; values + int32 indices, all-gathered",
            {"ratio": 0.01},
            _RATIO,
            TopK,
        ),
        CommSpec(
            "sign",
            "compressor",
            "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
            "mean absolute value times sign(x); 1 bit per entry + one scale, all-gathered",
            {},
            {},
            ScaledSign,
        ),
        CommSpec(
            "count-sketch",
            "compressor",
            "Sketching for First Order Method: Efficient Algorithm for Low-Bandwidth Channel and Vulnerability",
            "count sketch with fresh shared hashes per round; linear, all-reduced, desketched once",
            {"ratio": 0.125},
            _RATIO,
            CountSketch,
        ),
    )
}
_FEEDBACK = {
    s.name: s
    for s in (
        CommSpec("none", "error feedback", "-", "compressed messages averaged as they are", {}, {}),
        CommSpec(
            "ef",
            "error feedback",
            "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
            "classic error feedback: compress gradient + carried error, keep the remainder",
            {},
            {},
        ),
        CommSpec(
            "ef21",
            "error feedback",
            "EF21: A New, Simpler, Theoretically Better, and Practically Faster Error Feedback",
            "compress the change of each worker's gradient estimate (Markov compressor)",
            {"init": "full"},
            {"init": ("full", "compressed")},
        ),
        CommSpec(
            "ef21-w",
            "error feedback",
            "Error Feedback Reloaded: From Quadratic to Arithmetic Mean of Smoothness Constants",
            "EF21 with workers weighted by their smoothness constants L_i (needs smoothness=)",
            {"init": "full"},
            {"init": ("full", "compressed")},
        ),
    )
}
assert tuple(_FEEDBACK) == FEEDBACK
_SGC_PAPER = "Sequential Gradient Coding for Straggler Mitigation"
_CODING = {
    s.name: s
    for s in (
        CommSpec(
            "gc",
            "straggler coding",
            "Gradient Coding: Avoiding Stragglers in Distributed Learning (Tandon et al. 2017)",
            "fractional-repetition code, s stragglers per round (`gradient_coding.simulate_gc`)",
            {"s": 1, "mu": 0.1},
            {"s": Between(0, 1e9, integer=True), "mu": Between(0.0, 1e9)},
        ),
        CommSpec(
            "sr-sgc",
            "straggler coding",
            _SGC_PAPER,
            "GC with s = ceil(B lambda/(W-1+B)) plus selective repeats of missing tasks B rounds later "
            "(`gradient_coding.simulate_srsgc`)",
            {"b": 2, "w": 7, "lam": 3, "mu": 0.1},
            {k: Between(1, 1e9, integer=True) for k in ("b", "w", "lam")} | {"mu": Between(0.0, 1e9)},
        ),
        CommSpec(
            "m-sgc",
            "straggler coding",
            _SGC_PAPER,
            "jobs split into minitasks over rounds, (B, W, lambda)-bursty stragglers (`gradient_coding.simulate_msgc`)",
            {"b": 2, "w": 6, "lam": 3, "mu": 0.1},
            {k: Between(1, 1e9, integer=True) for k in ("b", "w", "lam")} | {"mu": Between(0.0, 1e9)},
        ),
    )
}


def comm_specs() -> list[CommSpec]:
    """Every compressor, every error-feedback scheme, then the straggler codes (simulated)."""
    return [*_COMPRESSORS.values(), *_FEEDBACK.values(), *_CODING.values()]


def create_compressor(name: str, **hyperparameters: Any) -> Compressor:
    """Compressor ``name`` (identity, topk, sign, count-sketch) with its defaults overridden."""
    if name not in _COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of: {', '.join(_COMPRESSORS)}")
    spec = _COMPRESSORS[name]
    return spec.factory(**check_hyperparameters(spec, hyperparameters))


def register_compression_hook(
    ddp_model: nn.Module,
    compressor: str | Compressor = "topk",
    *,
    feedback: str = "ef21",
    smoothness: Sequence[float] | None = None,
    seed: int = 0,
    process_group: Any = None,
    init: str = "full",
    **hyperparameters: Any,
) -> Any:
    """Register the compressing communication hook on a DistributedDataParallel model; returns its
    :class:`~trainlab.distributed.hooks.CompressionHookState` (bytes counters, ``state_dict``)."""
    from torch.nn.parallel import DistributedDataParallel

    from trainlab.distributed.hooks import CompressionHookState, compression_hook

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    if feedback not in _FEEDBACK:
        raise ValueError(f"unknown feedback {feedback!r}; choose one of: {', '.join(_FEEDBACK)}")
    if isinstance(compressor, str):
        compressor = create_compressor(compressor, **hyperparameters)
    elif hyperparameters:
        raise ValueError(f"hyperparameters {sorted(hyperparameters)} apply only to a compressor given by name")
    check_hyperparameters(_FEEDBACK[feedback], {"init": init} if "init" in _FEEDBACK[feedback].defaults else {})
    state = CompressionHookState(
        ddp_model, compressor, feedback, smoothness=smoothness, init=init, seed=seed, process_group=process_group
    )
    ddp_model.register_comm_hook(state, compression_hook)
    return state
