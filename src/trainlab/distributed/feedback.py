"""Error feedback around a compressor: one worker's messages and the aggregate every worker rebuilds.

All workers run the same code; worker ``rank`` of ``world_size`` keeps its own state and a replica of the server
state, keyed by a parameter's *name* (never by a DDP bucket index: DDP rebuilds its buckets after the first step,
so bucket-indexed state would silently mix parameters). State is tensors only (``state_dict``).

Schemes (g_i is worker i's gradient, C the compressor, n workers):

- ``none``:   send C(g_i); aggregate (1/n) sum_i C(g_i).
- ``ef``:     classic error feedback (Seide et al. 2014; Karimireddy et al. 2019, in gradient units as in PowerSGD):
              e_i += g_i; m_i = C(e_i); e_i -= m_i; aggregate (1/n) sum_i m_i.
- ``ef21``:   Richtarik et al. 2021: m_i = C(g_i - G_i); G_i += m_i; G += (1/n) sum_i m_i; the aggregate is G.
- ``ef21-w``: "Error Feedback Reloaded" (Richtarik et al. 2024), weights w_i = L_i / sum_j L_j from each worker's
              smoothness constant: m_i = C(g_i / (n w_i) - G_i); G_i += m_i; G += sum_i w_i m_i. With equal L_i it
              is EF21.

EF21's first round sends the full vector (G_i^0 = g_i(x^0), the papers' experiments) unless ``init="compressed"``
(G_i^0 = C(g_i(x^0)), the other start the analysis allows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainlab.distributed.compressors import Compressor, Identity

__all__ = ["FEEDBACK", "ErrorFeedback"]

FEEDBACK = ("none", "ef", "ef21", "ef21-w")
_DENSE = Identity()


class ErrorFeedback:
    """Worker ``rank``'s side of scheme ``kind`` (one of FEEDBACK) around ``compressor``.

    Per round and parameter: ``payload = encode(key, grad, seed)``; the payloads travel (summed when
    ``compressor.linear``, else gathered into one row per rank); ``receive(key, payloads, ...)`` returns the
    aggregate gradient estimate, identical on every worker."""

    def __init__(
        self,
        kind: str,
        compressor: Compressor,
        *,
        rank: int,
        world_size: int,
        smoothness: Sequence[float] | None = None,
        init: str = "full",
    ) -> None:
        if kind not in FEEDBACK:
            raise ValueError(f"kind must be one of {FEEDBACK}, got {kind!r}")
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a trainlab.distributed Compressor, got {type(compressor).__name__}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if init not in ("full", "compressed"):
            raise ValueError(f"init must be 'full' or 'compressed', got {init!r}")
        if (kind == "ef21-w") != (smoothness is not None):
            raise ValueError("smoothness (one L_i per worker) is required by 'ef21-w' and only accepted by it")
        if smoothness is not None:
            if len(smoothness) != world_size or not all(float(v) > 0 for v in smoothness):
                raise ValueError(f"smoothness must hold world_size={world_size} positive numbers, got {smoothness!r}")
            total = sum(float(v) for v in smoothness)
            self.coefficients = torch.tensor([float(v) / total for v in smoothness], dtype=torch.float64)
        else:
            self.coefficients = torch.full((world_size,), 1.0 / world_size, dtype=torch.float64)
        self.kind, self.compressor, self.rank, self.world_size, self.init = kind, compressor, rank, world_size, init
        # g_i / (n w_i): 1 for uniform weights, so EF21 sends g_i itself.
        self.scale = 1.0 / (world_size * float(self.coefficients[rank]))
        self.state: dict[str, dict[str, Tensor]] = {}
        self._pending: dict[str, Compressor] = {}  # the compressor each key was encoded with this round

    def round_compressor(self, key: str) -> Compressor:
        """The compressor this round uses for ``key``: dense for EF21's first round with ``init="full"``."""
        first = key not in self.state
        return _DENSE if self.kind in ("ef21", "ef21-w") and first and self.init == "full" else self.compressor

    def encode(self, key: str, grad: Tensor, seed: int) -> Tensor:
        """Worker side: update this worker's state with its gradient and return the payload to send."""
        g = grad.detach().reshape(-1)
        compressor = self._pending[key] = self.round_compressor(key)
        if self.kind == "none":
            v = g
        elif self.kind == "ef":
            st = self.state.setdefault(key, {"error": torch.zeros_like(g)})
            v = st["error"].add_(g)
        else:
            st = self.state.get(key)
            target = g if self.scale == 1.0 else g * self.scale
            if compressor.lossless:
                # Send the target itself: equal to sending target - G_i in exact arithmetic, and bitwise equal to
                # the plain all-reduce (G_i + (target - G_i) need not round back to target).
                v = target
            else:
                v = target if st is None else target - st["local"]
        payload = compressor.encode(v, seed)
        # Scaled (a new tensor) before the state moves: the identity's payload is v itself.
        sent = payload * float(self.coefficients[self.rank]) if compressor.linear else payload
        if self.kind != "none":
            m = v if compressor.lossless else compressor.decode(payload, g.numel(), g.dtype, seed)
            if self.kind == "ef":
                v.sub_(m)
            elif st is None or compressor.lossless:
                self.state[key] = {"local": m.clone(), "aggregate": torch.zeros_like(g)}
            else:
                st["local"].add_(m)
        return sent

    def receive(self, key: str, payloads: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        """Server side, run by every worker: the aggregate from the summed (linear compressors) or gathered
        (one row per rank) payloads of this round."""
        compressor = self._pending.pop(key, self.compressor)
        if compressor.linear:
            agg = compressor.decode(payloads, numel, dtype, seed)
        else:
            agg = compressor.decode_many(payloads, self.coefficients, numel, dtype, seed)
        if self.kind in ("none", "ef"):
            return agg
        st = self.state[key]
        if compressor.lossless:
            st["aggregate"] = agg.clone()
        else:
            st["aggregate"].add_(agg)
        return st["aggregate"]

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{key}.{name}": t for key, st in self.state.items() for name, t in st.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        loaded: dict[str, dict[str, Tensor]] = {}
        for flat, t in state.items():
            key, _, name = flat.rpartition(".")
            if name not in ("error", "local", "aggregate") or not isinstance(t, Tensor):
                raise ValueError(f"unexpected error-feedback state entry {flat!r}")
            loaded.setdefault(key, {})[name] = t.detach().clone()
        self.state = loaded
