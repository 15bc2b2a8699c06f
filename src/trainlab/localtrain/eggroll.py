"""EGGROLL (Evolution Strategies at the Hyperscale, 2025): low-rank antithetic evolution strategies.

Every population member perturbs each ``nn.Linear`` weight ``W ∈ R^{o×i}`` by ``E = s·(σ/√r)·A Bᵀ`` with
``A ∈ R^{o×r}``, ``B ∈ R^{i×r}`` drawn fresh per antithetic pair (members ``2k`` and ``2k+1`` share them,
``s = ±1``), and its bias by ``s·σ·ε``. ``E`` is never formed: a member's layer output is
``x Wᵀ + s(σ/√r)(x B) Aᵀ``, so its extra cost is ``r(o+i)`` instead of ``o·i``. The noise is regenerated from
``(seed, generation, layer, chunk)`` when the update needs it, never kept. Members run in chunks, each chunk
one batched forward of the user's model over ``chunk`` stacked copies of the batch. Fitnesses (minus the
loss) are z-scored, ``f̃ = (f − mean)/√(var + 1e-5)``, and the update handed to the optimizer as a gradient is
``g = −(√N/N)·Σ_i f̃_i E_i`` (σ folded into the learning rate, as in the official code), computed per chunk as
``−(√N/N)(σ/√r)·Σ_k (f̃_{2k} − f̃_{2k+1}) A_k B_kᵀ`` without per-member matrices. ``rank=0`` runs full-rank
ES (OpenAI-ES with antithetic pairs): ``E = s·σ·G`` with a dense Gaussian ``G``, the baseline EGGROLL replaces.

Defaults are those of the official end-to-end test (σ 0.2, lr 0.03, 64 members, rank 8); the official
solver default is plain SGD. The noise key folds in the generation, so every generation draws new
directions (the official ``noise_reuse=0`` reuses them unless the caller changes the key).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.localtrain.core import LocalTrainer
from trainlab.localtrain.registry import register_method
from trainlab.ranges import Between

PAPER = "Evolution Strategies at the Hyperscale (EGGROLL, 2025)"
_SHAPE_EPS = 1e-5

RowLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_rows(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy, unlabelled rows (-100) giving 0."""
    return F.cross_entropy(outputs.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none")


def shape_fitness(fitness: torch.Tensor) -> torch.Tensor:
    """``(f − mean f)/√(var f + 1e-5)`` over the population (population variance, as the official code)."""
    return (fitness - fitness.mean()) / torch.sqrt(fitness.var(unbiased=False) + _SHAPE_EPS)


class Eggroll(LocalTrainer):
    """Evolution strategies on the ``nn.Linear`` layers of any model whose rows are independent."""

    _counters = ("generation",)

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        sigma: float,
        lr: float,
        population: int,
        rank: int,
        chunk: int,
        optimizer: str,
        seed: int,
        loss: RowLoss = cross_entropy_rows,
    ) -> None:
        super().__init__()
        if population % 2:
            raise ValueError(f"population must be even (antithetic pairs), got {population}")
        if chunk % 2 or population % chunk:
            raise ValueError(f"chunk must be even and divide population={population}, got {chunk}")
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not self.layers:
            raise ValueError("EGGROLL perturbs nn.Linear layers; the model has none")
        covered = {id(p) for layer in self.layers for p in layer.parameters()}
        other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if other:
            raise ValueError(f"EGGROLL trains nn.Linear weights and biases only; freeze or remove: {other}")
        self.model, self.loss = model, loss
        self.sigma, self.lr, self.population, self.rank, self.chunk = sigma, lr, population, rank, chunk
        self.optimizer_name, self.seed = optimizer, seed
        self.generation = 0
        self.predictor = model
        self._noise: list[tuple[torch.Tensor, ...]] = []  # the current chunk's factors, one entry per layer

    def _trained(self) -> nn.Module:
        return self.model

    def _prepare(self, inputs: Any) -> list[torch.optim.Optimizer]:
        params = [p for layer in self.layers for p in layer.parameters()]
        if self.optimizer_name == "adamw":
            return [torch.optim.AdamW(params, lr=self.lr, foreach=True)]
        return [torch.optim.SGD(params, lr=self.lr, foreach=True)]

    def noise(self, layer: int, chunk: int) -> tuple[torch.Tensor, ...]:
        """The factors of one chunk's pairs for one layer, regenerated from their key.

        Low rank: ``(A, B, b)`` of shapes ``(P, o, r)``, ``(P, i, r)``, ``(P, o)``; full rank: ``(G, b)`` with
        ``G`` of shape ``(P, o, i)``. ``P = chunk/2`` pairs.
        """
        weight = self.layers[layer].weight
        out_f, in_f = weight.shape
        pairs = self.chunk // 2
        key = ((self.seed * 1_000_003 + self.generation) * 10_007 + layer) * 100_003 + chunk
        gen = torch.Generator(device=weight.device).manual_seed(key % 2**63)
        kw = {"generator": gen, "device": weight.device, "dtype": weight.dtype}
        bias = torch.randn(pairs, out_f, **kw)
        if self.rank == 0:
            return torch.randn(pairs, out_f, in_f, **kw), bias
        factors = torch.randn(pairs, out_f + in_f, self.rank, **kw)
        return factors[:, :out_f], factors[:, out_f:], bias

    def _signs(self, like: torch.Tensor) -> torch.Tensor:
        """``+1, −1, +1, −1, ...`` for the chunk's members (pair k = members 2k, 2k+1)."""
        return torch.tensor([1.0, -1.0], dtype=like.dtype, device=like.device).repeat(self.chunk // 2)

    def _perturb(self, layer: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer output of every member in the chunk: ``out + s(σ/√r)(x B)Aᵀ + sσε_b``."""
        noise = self._noise[layer]
        m = self.chunk
        s = self._signs(out)
        xm = x.reshape(m, -1, x.shape[-1])
        if self.rank == 0:
            dense, bias = noise
            delta = torch.einsum("mni,moi->mno", xm, dense.repeat_interleave(2, dim=0)) * self.sigma
        else:
            a, b, bias = noise
            xb = torch.einsum("mni,mir->mnr", xm, b.repeat_interleave(2, dim=0))
            delta = torch.einsum("mnr,mor->mno", xb, a.repeat_interleave(2, dim=0)) * (
                self.sigma / math.sqrt(self.rank)
            )
        if self.layers[layer].bias is not None:
            delta = delta + self.sigma * bias.repeat_interleave(2, dim=0)[:, None, :]
        return out + (s[:, None, None] * delta).reshape(out.shape)

    @contextmanager
    def _population(self, chunk: int) -> Iterator[None]:
        """Forward hooks that turn every Linear into the chunk's perturbed members."""
        self._noise = [self.noise(i, chunk) for i in range(len(self.layers))]
        handles = [
            layer.register_forward_hook(lambda mod, args, out, i=i: self._perturb(i, args[0], out))
            for i, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._noise = []

    def population_losses(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of every member on the batch, ``(population,)``, members evaluated ``chunk`` at a time."""
        m = self.chunk
        stacked = inputs.repeat(m, *([1] * (inputs.dim() - 1)))
        stacked_labels = labels.repeat(m, *([1] * (labels.dim() - 1)))
        losses = []
        with torch.no_grad():
            for c in range(self.population // m):
                with self._population(c):
                    rows = self.loss(self.model(stacked), stacked_labels)
                per_member = rows.reshape(m, -1)
                if labels.dtype == torch.long:  # mean over labelled rows only
                    counted = (labels.reshape(-1) != -100).sum().clamp_min(1)
                    losses.append(per_member.sum(1) / counted)
                else:
                    losses.append(per_member.mean(1))
        return torch.cat(losses)

    def _step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (optimizer,) = self._optimizers
        losses = self.population_losses(inputs, labels)
        shaped = shape_fitness(-losses)
        scale = -math.sqrt(self.population) / self.population * self.sigma
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                grad_w = torch.zeros_like(layer.weight)
                grad_b = None if layer.bias is None else torch.zeros_like(layer.bias)
                for c in range(self.population // self.chunk):
                    pair = shaped[c * self.chunk : (c + 1) * self.chunk].view(-1, 2)
                    weights = pair[:, 0] - pair[:, 1]  # f̃_{2k}·(+1) + f̃_{2k+1}·(−1)
                    noise = self.noise(i, c)
                    if self.rank == 0:
                        grad_w += torch.einsum("k,koi->oi", weights, noise[0]) * scale
                    else:
                        a, b = noise[0], noise[1]
                        grad_w += torch.einsum("kor,kir->oi", a * weights[:, None, None], b) * (
                            scale / math.sqrt(self.rank)
                        )
                    if grad_b is not None:
                        grad_b += (weights @ noise[-1]) * scale
                layer.weight.grad = grad_w
                if grad_b is not None:
                    layer.bias.grad = grad_b
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.generation += 1
        return losses.mean()


@register_method(
    "eggroll",
    paper=PAPER,
    summary="antithetic ES with rank-r perturbations A Bᵀ regenerated from seeds, never materialized",
    supports="linear-layers",
    defaults={
        "sigma": 0.2,
        "lr": 0.03,
        "population": 64,
        "rank": 8,
        "chunk": 16,
        "optimizer": "sgd",
        "seed": 0,
    },
    ranges={
        "sigma": Between(1e-8, 10.0),
        "lr": Between(1e-8, 10.0),
        "population": Between(2, 1 << 20, integer=True),
        "rank": Between(0, 1 << 16, integer=True),
        "chunk": Between(2, 1 << 20, integer=True),
        "optimizer": ("sgd", "adamw"),
        "seed": Between(0, 2**63 - 1, integer=True),
    },
)
def eggroll(model: nn.Module, *, num_classes: int, **hp: Any) -> Eggroll:
    return Eggroll(model, num_classes=num_classes, **hp)
