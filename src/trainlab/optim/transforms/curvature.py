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


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


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
    Memory: ngrads × the parameter count, plus ngrads² per tensor (plus one copy for ``momentum``).

    ``momentum`` μ > 0 averages the directions, ``v ← μv + (1−μ)u`` with v starting at zero as in
    optim.py (so the first step is (1−μ)u, not u).
    """

    name = "scale_by_mfac"
    wide_state = frozenset({"gram"})
    refuses_dtensor = "its gradient window and Gram matrix are plain tensors written row by row"
    hyperparameters = {"ngrads": 1024, "damp": 1e-5, "momentum": 0.0}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        m = group["ngrads"]
        return {
            "step": new_step_counter(),
            "grad_window": torch.zeros(m, param.numel(), dtype=param.dtype, device=param.device),
            "gram": torch.zeros(m, m, dtype=_wide(param.dtype), device=param.device),
            "momentum_buffer": torch.zeros_like(param, memory_format=torch.contiguous_format),
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
        # bfloat16/float16 gradients are stored exactly, but their products are summed in float32: rounded to
        # 8 bits, the Gram matrix and the Woodbury correction lose the step (damp 1e-5 amplifies the error).
        wide = [w.to(_wide(w.dtype)) for w in windows]
        flat = [f.to(w.dtype) for f, w in zip(flat, wide, strict=True)]
        dots = [w @ f for w, f in zip(wide, flat, strict=True)]
        torch._foreach_copy_([g[row] for g in grams], dots)
        torch._foreach_copy_([g[:, row] for g in grams], dots)
        coef = woodbury_coefficients(sum(g.double() for g in grams), sum(d.double() for d in dots), damp, m)
        out = [torch.addmv(f, w.T, coef.to(w.dtype), alpha=-1) for w, f in zip(wide, flat, strict=True)]
        torch._foreach_div_(out, damp)
        out = [o.reshape(u.shape).to(u.dtype) for o, u in zip(out, updates, strict=True)]
        if group["momentum"] > 0:
            torch._foreach_lerp_(state["momentum_buffer"], out, 1 - group["momentum"])
            return list(state["momentum_buffer"]), state
        return out, state


class PreconditionMKOR(GradientTransform):
    """MKOR: ``U = R⁻¹ [∇W | ∇b] L⁻¹``, rescaled to the gradient's norm, on observed Linear/Conv1D/Conv2d layers
    (∇W as ``(out, in)``: a Hugging Face Conv1D's transposed gradient).

    Every ``inv_freq`` steps (and every step of the first ``warmup_steps``) each inverse factor X is
    refreshed with its layer's batch-mean vector v (ā for L⁻¹, ḡ for R⁻¹) by Sherman-Morrison:
    ``X ← SM(γX + (1−γ)I, v)`` with γ = ``stat_decay``. When an entry of either factor exceeds 2 in
    magnitude, the layer's next refresh instead blends both toward the identity,
    ``X ← (1−ζ)X + ζI`` (ζ = ``stabilization_factor``), as mkor/mkor.py does. Parameters that are not
    the weight or bias of an observed layer pass through unchanged: the first-order transforms after
    this one in the chain are their declared fallback.

    The optimizer calls `precondition` for every observed layer before the chain runs (a layer's weight
    and bias may sit in different param groups); `update` hands each parameter its direction.
    """

    name = "precondition_mkor"
    refuses_dtensor = "its layer hooks see the unsharded module tensors, never the sharded parameters"
    hyperparameters = {"inv_freq": 10, "stat_decay": 0.95, "stabilization_factor": 0.1, "warmup_steps": 0}

    def __init__(self, observer: LayerObserver) -> None:
        self.observer = observer
        self.directions: dict[int, Tensor] = {}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        if not self.observer.layers:
            raise RuntimeError(
                "mkor has not seen a training forward pass through an nn.Linear or nn.Conv2d holding its "
                "parameters; create the optimizer before the forward pass of its first step. MKOR preconditions "
                "whole layer weights from the layer's inputs and output gradients, so parameters that are not a "
                "Linear/Conv2d weight (adapter factors: LoRA's A/B, S2FT blocks, ...) have nothing to precondition: "
                "train those with adamw, muon, galore, mfac or another trainlab optimizer. A torch.compile'd model "
                "does not run the global module forward hook MKOR observes layers with: run MKOR on the uncompiled "
                "model"
            )
        stats = self.observer.layers.get(id(param))
        # Parameters that are not a layer's weight get empty (0 × 0) factors: every state key must exist.
        matrix = param.t() if stats and stats.transposed else param  # (out, in ...)
        rows, cols = (matrix.shape[0], matrix[0].numel() + (stats.bias is not None)) if stats else (0, 0)
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

    def precondition(
        self,
        weight: Tensor,
        bias: Tensor | None,
        state: Mapping[str, Tensor],
        group: Mapping[str, Any],
        unscale: Tensor | None = None,
    ) -> None:
        """Precondition one layer from ``weight.grad`` (and ``bias.grad``; None: ∇b counts as zero, as for a
        frozen bias) with the weight's state; the directions wait in this transform until `update` takes them.

        ``unscale`` multiplies the output-gradient statistic: the factor by which the gradients were unscaled
        since backward (a GradScaler's 1/scale), so the factors see the same vectors as an unscaled run."""
        stats = self.observer.layers[id(weight)]
        state["step"].add_(1)
        t = int(state["step"]) - 1  # a CPU counter: no device sync
        left, right, reset = state["left_inv"], state["right_inv"], state["reset"]
        if t % group["inv_freq"] == 0 or t < group["warmup_steps"]:
            if stats.inputs is None or stats.output_grads is None:
                raise RuntimeError("mkor found no layer statistics: run forward and backward before step")
            output_grads = stats.output_grads
            if unscale is not None:  # the clamp of the unscaled rows, exact unless it cut them
                clip = self.observer.clipping
                unclamped = stats.output_grads_unclamped * unscale
                exact = stats.output_grads_peak * unscale <= clip
                output_grads = torch.where(exact, unclamped, unclamped.clamp(-clip, clip))
            self._refresh(left, stats.inputs, reset, group)
            self._refresh(right, output_grads, reset, group)
            too_big = torch.maximum(left.abs().max(), right.abs().max()) > 2
            reset.copy_(~reset.bool() & too_big)
        dw = weight.grad.t() if stats.transposed else weight.grad.reshape(weight.shape[0], -1)
        db = (bias.grad if bias is not None else dw.new_zeros(dw.shape[0])).reshape(-1, 1)
        pre = right @ torch.cat([dw, db.to(dw.dtype)], 1) @ left if stats.bias is not None else right @ dw @ left
        parts = [pre[:, : dw.shape[1]]] + ([pre[:, -1]] if bias is not None else [])
        grads = [dw] + ([db] if bias is not None else [])
        # Keep the gradient's norm (‖∇W‖ + ‖∇b‖)/(‖U_W‖ + ‖U_b‖); a zero gradient stays zero.
        scale = torch.nan_to_num(sum(torch._foreach_norm(grads)) / sum(torch._foreach_norm(parts)), nan=1.0)
        direction = parts[0] * scale
        self.directions[id(weight)] = direction.t() if stats.transposed else direction.reshape(weight.shape)
        if bias is not None:
            self.directions[id(bias)] = (parts[1] * scale).reshape(bias.shape)

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        return [self.directions.pop(id(p), u) for p, u in zip(params, updates, strict=True)], state

    def __getstate__(self) -> dict[str, Any]:
        # The observer hooks into this process's modules; the optimizer that owns it attaches a new one.
        return {**self.__dict__, "observer": None, "directions": {}}
