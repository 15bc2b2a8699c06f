"""DDP communication hooks that compress gradients, with error feedback keyed by parameter name.

``register_compression_hook(ddp_model, "topk", feedback="ef21", ratio=0.01)`` registers the hook on a
``DistributedDataParallel`` model and returns its state: bytes sent, the error-feedback state (``state_dict`` /
``load_state_dict``, tensors only, keyed by parameter names so it survives DDP's bucket rebuild and checkpoints).

Per bucket, each parameter's gradient is encoded on its own (Top-K per tensor, one sketch per tensor); the bucket's
payloads travel in one collective: all-reduce for linear compressors (sums of payloads decode to sums of
gradients), all-gather of the uint8 payloads otherwise. Every rank then decodes the same aggregate.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainlab.distributed.compressors import Compressor, round_seed
from trainlab.distributed.feedback import ErrorFeedback

__all__ = ["CompressionHookState", "compression_hook"]


class CompressionHookState:
    """What the hook keeps between steps; ``bytes_sent`` / ``dense_bytes`` are this rank's payload bytes per
    collective (the message size; a ring all-reduce moves about 2(n-1)/n of it per rank) and the bytes the plain
    all-reduce would have sent, summed over steps."""

    def __init__(
        self,
        model: nn.Module,
        compressor: Compressor,
        feedback: str = "none",
        *,
        smoothness: Sequence[float] | None = None,
        init: str = "full",
        seed: int = 0,
        process_group: Any = None,
    ) -> None:
        self.process_group = process_group
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.feedback = ErrorFeedback(
            feedback, compressor, rank=rank, world_size=world, smoothness=smoothness, init=init
        )
        module = getattr(model, "module", model)
        self.names = {id(p): name for name, p in module.named_parameters()}
        self.seed = seed
        self.steps: dict[str, int] = {}
        self.bytes_sent = 0
        self.dense_bytes = 0

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"feedback.{k}": v for k, v in self.feedback.state_dict().items()}
        state.update({f"step.{k}": torch.tensor(v) for k, v in self.steps.items()})
        state["bytes_sent"] = torch.tensor(self.bytes_sent)
        state["dense_bytes"] = torch.tensor(self.dense_bytes)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.feedback.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("feedback.")})
        self.steps = {k[5:]: int(v) for k, v in state.items() if k.startswith("step.")}
        self.bytes_sent, self.dense_bytes = int(state["bytes_sent"]), int(state["dense_bytes"])


def compression_hook(state: CompressionHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """The DDP communication hook: encode each parameter's gradient, exchange, write the aggregates in place."""
    fb = state.feedback
    grads = bucket.gradients()
    keys = [state.names[id(p)] for p in bucket.parameters()]
    seeds = []
    for key in keys:
        step = state.steps.get(key, 0)
        state.steps[key] = step + 1
        seeds.append(round_seed(state.seed, key, step))
    kinds = {fb.round_compressor(key).linear for key in keys}
    if len(kinds) > 1:  # EF21's dense first round for some keys only: a state_dict that misses parameters
        raise RuntimeError(f"error-feedback state covers only some of {keys}; load a state_dict with every parameter")
    linear = kinds.pop()
    payloads = [fb.encode(key, g, seed) for key, g, seed in zip(keys, grads, seeds, strict=True)]
    sizes = [p.numel() for p in payloads]
    flat = torch.cat(payloads)
    state.bytes_sent += flat.numel() * flat.element_size()
    state.dense_bytes += sum(g.numel() * g.element_size() for g in grads)

    if linear:
        fut = dist.all_reduce(flat, group=state.process_group, async_op=True).get_future()
    else:
        gathered = flat.new_empty(fb.world_size * flat.numel())
        fut = dist.all_gather_single(gathered, flat, group=state.process_group, async_op=True).get_future()

    def decode(done: torch.futures.Future) -> Tensor:
        wire = flat if linear else gathered.view(fb.world_size, -1)
        for key, g, seed, part in zip(keys, grads, seeds, wire.split(sizes, dim=-1), strict=True):
            g.copy_(fb.receive(key, part, g.numel(), g.dtype, seed).view_as(g))
        return bucket.buffer()

    return fut.then(decode)
