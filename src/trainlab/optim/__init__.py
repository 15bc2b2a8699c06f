"""Optimizers as chains of gradient transforms behind one `torch.optim.Optimizer`."""

from trainlab.optim import recipes  # noqa: F401  (registers every named optimizer)
from trainlab.optim.accounting import state_bytes
from trainlab.optim.compiled import compile_default, set_compile_default
from trainlab.optim.model_groups import create_optimizer, routing_table
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import OptimizerSpec, create, get_spec, optimizer_names, register_optimizer
from trainlab.optim.routing import matrices_to, partition
from trainlab.optim.transform import Chain, GradientTransform, chain

__all__ = [
    "Chain",
    "ChainOptimizer",
    "GradientTransform",
    "OptimizerSpec",
    "chain",
    "compile_default",
    "create",
    "create_optimizer",
    "get_spec",
    "matrices_to",
    "optimizer_names",
    "partition",
    "register_optimizer",
    "routing_table",
    "set_compile_default",
    "state_bytes",
]
