"""Memory-saving training methods that trade computation for activation memory, and the meter that counts it."""

from trainlab.memory.saved import SavedTensorMeter
from trainlab.memory.streambp import (
    ByteTransformerAdapter,
    StreamAdapter,
    adapter_for,
    streambp_backward,
    streambp_lm_loss,
    streambp_loss,
)

__all__ = [
    "ByteTransformerAdapter",
    "SavedTensorMeter",
    "StreamAdapter",
    "adapter_for",
    "streambp_backward",
    "streambp_lm_loss",
    "streambp_loss",
]
