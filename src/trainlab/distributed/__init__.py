"""Distributed training on torch.distributed: compressed gradient communication with error feedback (DDP
communication hooks), the same schemes simulated in one process, and sequential gradient coding.

Front door: ``register_compression_hook(ddp_model, "topk", feedback="ef21", ratio=0.01)``."""

from trainlab.distributed.compressors import Compressor, CountSketch, Identity, ScaledSign, TopK
from trainlab.distributed.feedback import FEEDBACK, ErrorFeedback
from trainlab.distributed.registry import CommSpec, comm_specs, create_compressor, register_compression_hook
from trainlab.distributed.simulate import SimulatedWorkers

__all__ = [
    "FEEDBACK",
    "CommSpec",
    "Compressor",
    "CountSketch",
    "ErrorFeedback",
    "Identity",
    "ScaledSign",
    "SimulatedWorkers",
    "TopK",
    "comm_specs",
    "create_compressor",
    "register_compression_hook",
]
