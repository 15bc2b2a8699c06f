"""n workers in one process, exchanging payloads exactly as the DDP hook does (same compressor and feedback code).

Used where spawning processes would be too slow (the claims) and to test the schemes against their equations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainlab.distributed.compressors import Compressor, round_seed
from trainlab.distributed.feedback import ErrorFeedback

__all__ = ["SimulatedWorkers"]


class SimulatedWorkers:
    """``aggregate(grads)`` takes one gradient per worker (a tensor, or a dict of named tensors) and returns the
    aggregate every worker rebuilds. ``bytes_sent`` counts the payload bytes one worker sent, summed over
    rounds (mean over workers); ``dense_bytes`` what the uncompressed all-reduce would have sent."""

    def __init__(
        self,
        num_workers: int,
        compressor: Compressor,
        feedback: str = "none",
        *,
        smoothness: Sequence[float] | None = None,
        init: str = "full",
        seed: int = 0,
    ) -> None:
        self.workers = [
            ErrorFeedback(feedback, compressor, rank=i, world_size=num_workers, smoothness=smoothness, init=init)
            for i in range(num_workers)
        ]
        self.seed = seed
        self.rounds = 0
        self.bytes_sent = 0
        self.dense_bytes = 0

    def aggregate(self, grads: Sequence[Tensor | dict[str, Tensor]]) -> Tensor | dict[str, Tensor]:
        if len(grads) != len(self.workers):
            raise ValueError(f"grads must hold one entry per worker ({len(self.workers)}), got {len(grads)}")
        named = [g if isinstance(g, dict) else {"x": g} for g in grads]
        out = {}
        for key in named[0]:
            seed = round_seed(self.seed, key, self.rounds)
            first = named[0][key]
            compressor = self.workers[0].round_compressor(key)
            payloads = [w.encode(key, g[key], seed) for w, g in zip(self.workers, named, strict=True)]
            wire = torch.stack(payloads).sum(0) if compressor.linear else torch.stack(payloads)
            results = [w.receive(key, wire, first.numel(), first.dtype, seed) for w in self.workers]
            out[key] = results[0].view_as(first).clone()
            self.bytes_sent += sum(p.numel() * p.element_size() for p in payloads) // len(payloads)
            self.dense_bytes += first.numel() * first.element_size()
        self.rounds += 1
        return out if isinstance(grads[0], dict) else out["x"]
