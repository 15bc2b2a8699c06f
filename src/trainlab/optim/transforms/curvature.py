"""Second-order transforms: AdaHessian's Hessian-diagonal scaling, M-FAC's windowed inverse Fisher and
MKOR's rank-1 Kronecker preconditioner. The curvature itself comes from `trainlab.curvature`.

AdaHessian and MKOR need curvature that a gradient alone does not carry (a Hessian-vector product; layer
inputs and output gradients). Their optimizers measure it during ``step`` and hand it to the transform
through a `CurvatureFeed`, keyed by parameter, that is emptied as it is read, so a stale estimate is
never reused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trainlab.curvature.fisher import woodbury_coefficients
from trainlab.curvature.kronecker import LayerObserver, sherman_morrison
from trainlab.optim.transform import GradientTransform, State, new_step_counter, step_counts
from trainlab.optim.transforms.adam import adam_ratio, bias_corrections


class CurvatureFeed:
    """Per-step tensors (e.g. ``|Hz|``) passed from an optimizer's ``step`` to its transform."""

    def __init__(self, what: str, how: str) -> None:
        self.what, self.how = what, how
        self._values: dict[int, Tensor] = {}

    def put(self, params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        self._values.update({id(p): v for p, v in zip(params, values, strict=True)})

    def take(self, params: Sequence[Tensor]) -> list[Tensor]:
        missing = [tuple(p.shape) for p in params if id(p) not in self._values]
        if missing:
            raise RuntimeError(f"no {self.what} for parameters of shapes {missing}; {self.how}")
        return [self._values.pop(id(p)) for p in params]


class ScaleByAdaHessian(GradientTransform):
    """``u = m̂ / ((√v̂)^k + ε)`` with ``m`` the EMA of gradients and ``v`` of ``D²``, ``D = |Hz|``.

    For 4-D (conv) kernels D is averaged over the two spatial dimensions (the paper's spatial
    averaging). Equations and defaults: amirgholami/adahessian, optim_adahessian.py.
    """

    name = "scale_by_adahessian"
    hyperparameters = {"betas": (0.9, 0.999), "eps": 1e-4, "hessian_power": 1.0}

    def __init__(self, feed: CurvatureFeed) -> None:
        self.feed = feed

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {
            "step": new_step_counter(),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_hessian_diag_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        beta1, beta2 = group["betas"]
        power = group["hessian_power"]
        steps = step_counts(state)
        diag = torch._foreach_abs(self.feed.take(params))
        diag = [d.mean(dim=(2, 3), keepdim=True).expand_as(d) if d.ndim == 4 else d for d in diag]
        m, v = state["exp_avg"], state["exp_hessian_diag_sq"]
        torch._foreach_lerp_(m, updates, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, diag, diag, 1 - beta2)
        # m̂ / ((√v̂)^k + ε) is Adam's ratio with v^k in place of v and the v-correction to the power k.
        a, b = bias_corrections(steps, group["betas"])
        if power != 1:
            v, b = torch._foreach_pow(v, power), [bi**power for bi in b]
        return adam_ratio(m, v, group["eps"], a, b), state


class ScaleByMFAC(GradientTransform):
    """M-FAC's dynamic algorithm: ``u = (λI + GᵀG/m)⁻¹ g`` over the group's parameters as one vector.

    ``G`` holds the last ``ngrads`` gradients (zeros until filled, as in IST-DASLab/M-FAC optim.py).
    Each parameter keeps its slice of the window (ngrads × numel) and its share ``G_p G_pᵀ`` of the
    Gram matrix (ngrads²), so the state stays per-parameter while the inverse is the global one:
    the shares are summed, one ngrads × ngrads system is solved, and each slice is corrected.
    Memory: ngrads × the parameter count, plus ngrads² per tensor.
    """

    name = "scale_by_mfac"
    hyperparameters = {"ngrads": 1024, "damp": 1e-5}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        m = group["ngrads"]
        return {
            "step": new_step_counter(),
            "grad_window": torch.zeros(m, param.numel(), dtype=param.dtype, device=param.device),
            "gram": torch.zeros(m, m, dtype=param.dtype, device=param.device),
        }

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        windows, grams = state["grad_window"], state["gram"]
        m, damp = windows[0].shape[0], group["damp"]
        if group["ngrads"] != m:
            raise ValueError(f"ngrads cannot change after the first step ({m} -> {group['ngrads']})")
        steps = step_counts(state)
        if len(set(steps)) != 1:
            raise RuntimeError(
                "M-FAC's gradient window spans all parameters of a group, so every parameter needs a "
                "gradient at every step; put parameters that sometimes get none in another group"
            )
        row = int(steps[0] - 1) % m
        flat = [u.reshape(-1) for u in updates]
        torch._foreach_copy_([w[row] for w in windows], flat)
        dots = [w @ f for w, f in zip(windows, flat, strict=True)]
        torch._foreach_copy_([g[row] for g in grams], dots)
        torch._foreach_copy_([g[:, row] for g in grams], dots)
        coef = woodbury_coefficients(sum(g.double() for g in grams), sum(d.double() for d in dots), damp, m)
        out = [torch.addmv(f, w.T, coef.to(w.dtype), alpha=-1) for w, f in zip(windows, flat, strict=True)]
        torch._foreach_div_(out, damp)
        return [o.reshape(u.shape) for o, u in zip(out, updates, strict=True)], state


class PreconditionMKOR(GradientTransform):
    """MKOR: ``U = R⁻¹ [∇W | ∇b] L⁻¹``, rescaled to the gradient's norm, on observed Linear/Conv2d layers.

    Every ``inv_freq`` steps (and every step of the first ``warmup_steps``) each inverse factor X is
    refreshed with its layer's batch-mean vector v (ā for L⁻¹, ḡ for R⁻¹) by Sherman-Morrison:
    ``X ← SM(γX + (1−γ)I, v)`` with γ = ``stat_decay``. When an entry of either factor exceeds 2 in
    magnitude, the layer's next refresh instead blends both toward the identity,
    ``X ← (1−ζ)X + ζI`` (ζ = ``stabilization_factor``), as mkor/mkor.py does. Parameters that are not
    the weight or bias of an observed layer pass through unchanged: the first-order transforms after
    this one in the chain are their declared fallback.
    """

    name = "precondition_mkor"
    hyperparameters = {"inv_freq": 10, "stat_decay": 0.95, "stabilization_factor": 0.1, "warmup_steps": 0}

    def __init__(self, observer: LayerObserver) -> None:
        self.observer = observer

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        if not self.observer.layers:
            raise RuntimeError(
                "mkor has not seen a training forward pass through an nn.Linear or nn.Conv2d holding its "
                "parameters; create the optimizer before the forward pass of its first step"
            )
        stats = self.observer.layers.get(id(param))
        # Parameters that are not a layer's weight get empty (0 × 0) factors: every state key must exist.
        rows, cols = (param.shape[0], param[0].numel() + (stats.bias is not None)) if stats else (0, 0)
        return {
            "step": new_step_counter(),
            "left_inv": torch.eye(cols, dtype=param.dtype, device=param.device),
            "right_inv": torch.eye(rows, dtype=param.dtype, device=param.device),
            # mkor.py starts with its reset flag set: the first refresh sets both factors to I. A 0/1 number,
            # not a bool: torch.optim's load_state_dict casts state to the parameter's dtype.
            "reset": torch.ones((), dtype=param.dtype, device=param.device),
        }

    def _refresh(self, inverse: Tensor, v: Tensor, reset: Tensor, group: Mapping[str, Any]) -> None:
        gamma, zeta = group["stat_decay"], group["stabilization_factor"]
        eye = torch.eye(inverse.shape[0], dtype=inverse.dtype, device=inverse.device)
        updated = sherman_morrison(gamma * inverse + (1 - gamma) * eye, v.to(inverse.dtype))
        inverse.copy_(torch.where(reset.bool(), (1 - zeta) * inverse + zeta * eye, updated))

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        t = step_counts(state)[0] - 1
        refresh = t % group["inv_freq"] == 0 or t < group["warmup_steps"]
        position = {id(p): i for i, p in enumerate(params)}
        out = list(updates)
        for i, p in enumerate(params):
            stats = self.observer.layers.get(id(p))
            if stats is None:
                continue
            j = None if stats.bias is None else position.get(id(stats.bias))
            if stats.bias is not None and j is None:
                raise ValueError("mkor preconditions a layer's weight and bias together: put both in one group")
            left, right, reset = state["left_inv"][i], state["right_inv"][i], state["reset"][i]
            if refresh:
                if stats.inputs is None or stats.output_grads is None:
                    raise RuntimeError("mkor found no layer statistics: run forward and backward before step")
                self._refresh(left, stats.inputs, reset, group)
                self._refresh(right, stats.output_grads, reset, group)
                too_big = torch.maximum(left.abs().max(), right.abs().max()) > 2
                reset.copy_(~reset.bool() & too_big)
            grads = [updates[i].reshape(p.shape[0], -1)] + ([] if j is None else [updates[j].reshape(-1, 1)])
            pre = right @ torch.cat(grads, 1) @ left
            parts = [pre[:, : grads[0].shape[1]]] + ([] if j is None else [pre[:, -1]])
            # Keep the gradient's norm (‖∇W‖ + ‖∇b‖)/(‖U_W‖ + ‖U_b‖); a zero gradient stays zero.
            scale = torch.nan_to_num(sum(torch._foreach_norm(grads)) / sum(torch._foreach_norm(parts)), nan=1.0)
            out[i] = (parts[0] * scale).reshape(p.shape)
            if j is not None:
                out[j] = (parts[1] * scale).reshape(params[j].shape)
        return out, state
