"""Training without end-to-end backpropagation: layer-local losses, denoising blocks, evolution strategies.

One front door: ``create(name, model, num_classes=C, **hyperparameters)`` returns a trainer with
``step(inputs, labels)`` and a ``predictor`` module; ``method_names()`` and ``get_spec(name)`` read the registry.
"""

from trainlab.localtrain import eggroll, forward_forward, forward_gnn, gbnn, mono_forward, noprop  # noqa: F401  (registration side effect)
from trainlab.localtrain.core import LocalTrainer, Residual, as_sequential, split_blocks, train_blocks_locally
from trainlab.localtrain.registry import LocalSpec, create, get_spec, method_names, register_method

__all__ = [
    "as_sequential",
    "LocalSpec",
    "LocalTrainer",
    "Residual",
    "create",
    "get_spec",
    "method_names",
    "register_method",
    "split_blocks",
    "train_blocks_locally",
]
