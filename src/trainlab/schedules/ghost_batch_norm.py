"""Ghost Batch Normalization and regime adaptation (Hoffer, Hubara, Soudry, "Train longer, generalize
better: closing the generalization gap in large batch training of neural networks"; eladhoffer/bigBatch).

- `GhostBatchNorm`: BatchNorm whose training-mode statistics come from "ghost" batches of
  ``virtual_batch_size`` samples instead of the whole batch, so a large batch is normalized as the
  small batches it replaces. The running statistics take one momentum step per ghost batch, in order,
  as the official main_gbn.py gets by forwarding each chunk separately. Evaluation uses the running
  statistics, as BatchNorm does; a ghost batch as large as the batch is exactly BatchNorm.
- `adapt_regime`: the paper's regime adaptation, which keeps the number of updates of the small-batch
  regime: lr × √(B_L/B_S), and the epochs and lr-drop epochs × B_L/B_S (`Regime` converts to steps).

The official GBN runs also clip the gradient norm at 5; that is the optimizer's business
(torch.nn.utils.clip_grad_norm_), not the layer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainlab.schedules.registry import BatchMethodSpec, register_batch_method

GBN_PAPER = (
    "Train longer, generalize better: closing the generalization gap in large batch training of neural "
    "networks (Hoffer, Hubara, Soudry, 2017)"
)


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``BatchNorm1d``/``BatchNorm2d``/``BatchNorm3d`` (inputs ``(N, C, *)``) over ghost batches.

    Same parameters and buffers as BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so state dicts move between the two. In training mode the batch is cut into
    consecutive ghost batches of ``virtual_batch_size`` (the last may be smaller); each is normalized by
    its own mean and biased variance, and the running statistics are updated once per ghost batch with
    its unbiased variance, as BatchNorm updates them once per batch. Official default B_S = 128.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 128,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be an integer >= 2, got {virtual_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.virtual_batch_size = virtual_batch_size

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GhostBatchNorm expects input of shape (N, C, *), got {tuple(input.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        n, b = input.shape[0], self.virtual_batch_size
        if not self.training or n <= b:
            return super().forward(input)
        if n % b or self.momentum is None or not self.track_running_stats:
            # Ragged last ghost batch, or a cumulative average: BatchNorm on each chunk, in order.
            return torch.cat([super(GhostBatchNorm, self).forward(chunk) for chunk in input.split(b)])
        return self._equal_ghost_batches(input)

    def _equal_ghost_batches(self, input: Tensor) -> Tensor:
        """k = N/B ghost batches at once: ``[k, B, C, *]``, statistics over the batch and spatial dims."""
        n, b, c = input.shape[0], self.virtual_batch_size, input.shape[1]
        ghosts = input.reshape(n // b, b, *input.shape[1:])
        dims = [1, *range(3, ghosts.dim())]
        var, mean = torch.var_mean(ghosts, dim=dims, correction=0, keepdim=True)
        shape = [1, 1, c] + [1] * (ghosts.dim() - 3)
        out = (ghosts - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        self._update_running_stats(mean.reshape(-1, c), var.reshape(-1, c), ghosts[0, :, 0].numel())
        return out.reshape(input.shape)

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, variances: Tensor, count: int) -> None:
        """k sequential momentum steps ``r ← (1−m)r + m·x_j`` in closed form:
        ``r_k = (1−m)^k r_0 + Σ_j m(1−m)^{k−j} x_j``, with x_j the unbiased variance for running_var."""
        k, m = means.shape[0], float(self.momentum)  # type: ignore[arg-type]
        weights = m * (1 - m) ** torch.arange(k - 1, -1, -1, dtype=means.dtype, device=means.device)
        unbiased = variances.detach() * (count / (count - 1))
        running_mean, running_var = self.running_mean, self.running_var  # tracked: see forward
        running_mean.mul_((1 - m) ** k).add_(weights @ means.detach().to(running_mean.dtype))  # type: ignore[union-attr]
        running_var.mul_((1 - m) ** k).add_(weights @ unbiased.to(running_var.dtype))  # type: ignore[union-attr]
        self.num_batches_tracked.add_(k)  # type: ignore[union-attr]


def to_ghost_batch_norm_(model: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace, in place, every BatchNorm1d/2d/3d of ``model`` by a `GhostBatchNorm` with its parameters,
    buffers and settings; returns ``model``."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GhostBatchNorm):
            ghost = GhostBatchNorm(
                child.num_features,
                virtual_batch_size,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            ).to(device=child.running_mean.device if child.running_mean is not None else None)
            ghost.load_state_dict(child.state_dict())
            ghost.train(child.training)
            setattr(model, name, ghost)
        else:
            to_ghost_batch_norm_(child, virtual_batch_size)
    return model


@dataclass(frozen=True)
class Regime:
    """A training regime in epochs, as the paper states them: lr, length and lr-drop epochs at a batch size."""

    lr: float
    epochs: float
    batch_size: int
    milestones: tuple[float, ...] = ()

    def steps(self, dataset_size: int) -> int:
        """Optimizer steps of the regime on ``dataset_size`` samples."""
        return max(1, round(self.epochs * dataset_size / self.batch_size))

    def milestone_steps(self, dataset_size: int) -> tuple[int, ...]:
        """The lr-drop epochs as step counts (e.g. for torch's MultiStepLR)."""
        return tuple(max(1, round(m * dataset_size / self.batch_size)) for m in self.milestones)


def adapt_regime(regime: Regime, new_batch_size: int) -> Regime:
    """The paper's regime adaptation of ``regime`` to ``new_batch_size`` (B_L; B_S = ``regime.batch_size``):
    lr × √(B_L/B_S), epochs and lr-drop epochs × B_L/B_S, so the large batch takes as many updates as the
    small-batch regime did (main_normal.py)."""
    if not isinstance(regime, Regime):
        raise TypeError(f"regime must be a Regime, got {type(regime).__name__}")
    if not (isinstance(regime.lr, int | float) and regime.lr > 0):
        raise ValueError(f"regime.lr must be a number > 0, got {regime.lr!r}")
    if not (isinstance(regime.epochs, int | float) and regime.epochs > 0):
        raise ValueError(f"regime.epochs must be a number > 0, got {regime.epochs!r}")
    if any(not 0 < m <= regime.epochs for m in regime.milestones):
        raise ValueError(f"regime.milestones must lie in (0, epochs={regime.epochs}], got {list(regime.milestones)}")
    for name, b in (("regime.batch_size", regime.batch_size), ("new_batch_size", new_batch_size)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive integer, got {b!r}")
    ratio = new_batch_size / regime.batch_size
    return Regime(
        lr=regime.lr * math.sqrt(ratio),
        epochs=regime.epochs * ratio,
        batch_size=new_batch_size,
        milestones=tuple(m * ratio for m in regime.milestones),
    )


register_batch_method(
    BatchMethodSpec(
        name="ghost-batch-norm",
        paper=GBN_PAPER,
        summary="BatchNorm over ghost batches of B_S samples inside a large batch, plus regime adaptation "
        "(lr x sqrt(B_L/B_S), epochs x B_L/B_S: as many updates as the small batch)",
        entry="trainlab.schedules.GhostBatchNorm, trainlab.schedules.adapt_regime",
        defaults={"virtual_batch_size": 128, "eps": 1e-5, "momentum": 0.1},
    )
)
