"""Adaptive batch sizes for adaptive gradient methods: AdAdaGrad's norm and (augmented) inner-product tests.

Lau, Liu and Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods" (official code
timlautk/AdAdaGrad, tests.py). With g_i the gradients of the b samples of the current batch, ḡ their mean
and Var the sample variance over i (ddof 1), each test proposes a batch size b':

    norm test            b' = Σ_coords Var_i(g_i) / (η² ‖ḡ‖²)
    inner-product test   b' = Var_i(⟨g_i, ḡ⟩) / (θ² ‖ḡ‖⁴)
    augmented test       b' = max(inner-product b', Σ_coords Var_i(g_i − ⟨g_i, ḡ⟩ ḡ/‖ḡ‖²) / (ν² ‖ḡ‖²))

and the batch only grows: ``b ← min(max(b, ⌈b'⌉), b_max)``. Defaults η = 0.1, θ = 0.5, ν = 1 (the
official scripts' choices). The inner products run over the whole parameter vector, as in the paper;
tests.py computes them per tensor and sums the variances, which drops the covariances between tensors.

Per-sample gradients come from ``torch.func.vmap`` (as tests.py does), on the first ``test_samples``
samples of the batch (the statistics are then estimated on that subset, so draw batches in random order;
the step still uses the whole batch's gradient). The first vmap call of a process costs several seconds
(torch.func's one-time setup). Models whose forward mixes samples (BatchNorm in training mode) use ``micro_batch``
instead: the batch is split into micro-batches of that size, and ``micro_batch · Var_j(h_j)`` of the
micro-batch mean gradients h_j estimates the per-sample variances.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from trainlab.schedules.registry import BatchMethodSpec, register_batch_method

TESTS = ("norm", "inner_product", "augmented")
LossOf = Callable[[Any, Any], Tensor]  # loss_fn(model, batch) -> mean loss over the batch

ADADAGRAD_PAPER = "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods (Lau, Liu, Kolar, 2024)"


def _row_statistics(gradients: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(‖g_j‖², ⟨g_j, ḡ⟩, ‖ḡ‖²)`` over the whole parameter vector, for the k rows j, in float64.

    One tensor at a time (no ``[k, D]`` concatenation): each is ``[k, *param.shape]``.
    """
    if not gradients:
        raise ValueError("gradients must hold one [k, *shape] tensor per parameter, got none")
    k = gradients[0].shape[0]
    if k < 2 or any(g.shape[0] != k for g in gradients):
        raise ValueError(
            f"every gradient tensor needs the same leading size k >= 2, got {[g.shape[0] for g in gradients]}"
        )
    sq_norms = torch.zeros(k, dtype=torch.float64, device=gradients[0].device)
    inner, mean_sq = torch.zeros_like(sq_norms), sq_norms.new_zeros(())
    for g in gradients:
        rows = g.detach().reshape(k, -1).double()
        mean = rows.mean(0)
        sq_norms += (rows * rows).sum(1)
        inner += rows @ mean
        mean_sq += mean @ mean
    return sq_norms, inner, mean_sq


def proposed_batch_size(
    gradients: Sequence[Tensor],
    test: str = "norm",
    *,
    eta: float = 0.1,
    theta: float = 0.5,
    nu: float = 1.0,
    samples_per_row: int = 1,
) -> float:
    """The batch size ``b'`` that ``test`` asks for, from per-sample (or per-micro-batch) gradients.

    ``gradients`` holds one tensor per parameter, shaped ``[k, *param.shape]``: row j is sample j's
    gradient, or the mean gradient of micro-batch j when ``samples_per_row`` > 1 (its variance is then
    scaled by ``samples_per_row`` to estimate the per-sample one). A zero mean gradient gives ``inf``.

    The variances come from row norms and inner products: ``Σ_coords Var(g) = (Σ‖g_j‖² − k‖ḡ‖²)/(k−1)``,
    and since the coefficients ⟨g_j, ḡ⟩/‖ḡ‖² average to 1 the orthogonal parts have mean zero, so their
    summed variance is ``Σ(‖g_j‖² − ⟨g_j, ḡ⟩²/‖ḡ‖²)/(k−1)``.
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    sq_norms, inner, sq = _row_statistics(gradients)
    k = sq_norms.numel()
    if sq == 0:
        return math.inf
    if test == "norm":
        return float(samples_per_row * (sq_norms.sum() - k * sq) / (k - 1) / (eta**2 * sq))
    ip = float(samples_per_row * inner.var(correction=1) / (theta**2 * sq**2))
    if test == "inner_product":
        return ip
    ortho = (sq_norms - inner * inner / sq).sum() / (k - 1)
    return max(ip, float(samples_per_row * ortho / (nu**2 * sq)))


def _split(batch: Any, size: int) -> list[Any]:
    """``batch`` (a tensor, or a tuple/list of tensors sharing dim 0) cut into pieces of ``size`` rows."""
    if isinstance(batch, Tensor):
        return list(batch.split(size))
    if isinstance(batch, tuple | list) and batch and all(isinstance(t, Tensor) for t in batch):
        return [type(batch)(parts) for parts in zip(*(t.split(size) for t in batch), strict=True)]
    raise TypeError(f"batch must be a tensor or a tuple/list of tensors split along dim 0, got {type(batch).__name__}")


def batch_length(batch: Any) -> int:
    """The number of samples of ``batch`` (dim 0 of its first tensor)."""
    return _split(batch, 1 << 62)[0][0].shape[0] if not isinstance(batch, Tensor) else batch.shape[0]


def per_sample_gradients(model: nn.Module, loss_fn: LossOf, batch: Any) -> list[Tensor]:
    """The gradient of ``loss_fn(model, sample)`` for each sample of ``batch``, by ``torch.func.vmap``.

    One tensor per trainable parameter (in ``model.parameters()`` order), shaped ``[b, *param.shape]``.
    ``loss_fn`` must use the model only by calling it (it receives a functional stand-in); the model and
    its buffers are not changed.
    """
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_of_one(params: dict[str, Tensor], sample: Any) -> Tensor:
        def stand_in(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, (params, buffers), args, kwargs)

        one = sample.unsqueeze(0) if isinstance(sample, Tensor) else type(sample)(t.unsqueeze(0) for t in sample)
        return loss_fn(stand_in, one)

    grads = vmap(grad(loss_of_one), in_dims=(None, 0), randomness="different")(named, batch)
    return [grads[n] for n in named]


def micro_batch_gradients(
    model: nn.Module, loss_fn: LossOf, batch: Any, micro_batch: int
) -> tuple[list[Tensor], Tensor]:
    """The mean gradient of each ``micro_batch``-sized piece of ``batch`` (one backward each), as
    ``[k, *param.shape]`` per trainable parameter, and the batch's mean loss; ``batch`` must hold a multiple
    of ``micro_batch`` samples."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch_length(batch)
    if n % micro_batch:
        raise ValueError(f"the batch ({n} samples) must be a multiple of micro_batch={micro_batch}")
    rows, losses = [], []
    for piece in _split(batch, micro_batch):
        loss = loss_fn(model, piece)
        rows.append(torch.autograd.grad(loss, params))
        losses.append(loss.detach())
    return [torch.stack(per_param) for per_param in zip(*rows, strict=True)], torch.stack(losses).mean()


class AdaptiveBatchSize:
    """AdAdaGrad's batch-size controller, for a user's own loop or the lab runner.

    Each step: draw a batch of ``batch_size`` samples, call ``backward(model, loss_fn, batch)`` (it fills
    ``.grad`` with the batch's mean gradient, as ``loss.backward()`` would, and runs the test), then step
    the optimizer (AdaGrad, AdaGradNorm, Adam, ...). The next ``batch_size`` is the test's answer. Or run
    your own backward and call ``update(gradients)`` with per-sample gradients.

    ``batch_size`` is rounded up to a multiple of ``micro_batch`` when that is set.
    """

    def __init__(
        self,
        initial: int,
        maximum: int,
        *,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.5,
        nu: float = 1.0,
        test_samples: int = 256,
        micro_batch: int | None = None,
    ) -> None:
        for name, value, low in (
            ("initial", initial, 2),
            ("maximum", maximum, initial),
            ("test_samples", test_samples, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if test not in TESTS:
            raise ValueError(f"test must be one of {TESTS}, got {test!r}")
        for name, value in (("eta", eta), ("theta", theta), ("nu", nu)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if micro_batch is not None and (not isinstance(micro_batch, int) or not 1 <= micro_batch <= initial // 2):
            raise ValueError(f"micro_batch must be None or an integer in [1, initial/2], got {micro_batch!r}")
        self.maximum, self.test, self.micro_batch = maximum, test, micro_batch
        self.eta, self.theta, self.nu, self.test_samples = eta, theta, nu, test_samples
        self.batch_size = self._round(initial)
        self.history: list[int] = []  # the batch size of every step taken

    def _round(self, b: int) -> int:
        m = self.micro_batch or 1
        return min(-(-b // m) * m, self.maximum // m * m)

    def update(self, gradients: Sequence[Tensor], samples_per_row: int = 1) -> int:
        """Grow ``batch_size`` to the test's ``⌈b'⌉`` (never shrink, never past ``maximum``); returns it."""
        proposed = proposed_batch_size(
            gradients, self.test, eta=self.eta, theta=self.theta, nu=self.nu, samples_per_row=samples_per_row
        )
        if proposed > self.batch_size:
            self.batch_size = self._round(self.maximum if math.isinf(proposed) else math.ceil(proposed))
        return self.batch_size

    def backward(self, model: nn.Module, loss_fn: LossOf, batch: Any) -> Tensor:
        """``loss_fn(model, batch).backward()`` plus the test on this batch; returns the detached loss."""
        self.history.append(batch_length(batch))
        if self.micro_batch is None:
            loss = loss_fn(model, batch)
            loss.backward()
            self.update(per_sample_gradients(model, loss_fn, _split(batch, self.test_samples)[0]))
            return loss.detach()
        rows, loss = micro_batch_gradients(model, loss_fn, batch, self.micro_batch)
        params = [p for p in model.parameters() if p.requires_grad]
        for p, r in zip(params, rows, strict=True):  # accumulate as backward() would
            mean = r.mean(0)
            p.grad = mean if p.grad is None else p.grad.add_(mean)
        self.update(rows, samples_per_row=self.micro_batch)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size, self.history = int(state["batch_size"]), list(state["history"])


register_batch_method(
    BatchMethodSpec(
        name="adadagrad",
        paper=ADADAGRAD_PAPER,
        summary="grow the batch when the norm / augmented inner-product test says the gradient is too noisy",
        entry="trainlab.schedules.AdaptiveBatchSize",
        defaults={"test": "norm", "eta": 0.1, "theta": 0.5, "nu": 1.0, "test_samples": 256},
    )
)
