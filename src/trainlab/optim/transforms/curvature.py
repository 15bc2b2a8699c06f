"""Second-order transforms: AdaHessian's Hessian-diagonal scaling, M-FAC's windowed inverse Fisher and
MKOR's rank-1 Kronecker preconditioner. The curvature itself comes from `trainlab.curvature`.

AdaHessian and MKOR need curvature that a gradient alone does not carry (a Hessian-vector product; layer
inputs and output gradients). Their optimizers measure it during ``step`` and hand it to the transform
through a `CurvatureFeed`, keyed by parameter, that is emptied as it is read, so a stale estimate is
never reused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainlab.curvature.fisher import woodbury_coefficients
from trainlab.curvature.kronecker import LayerObserver, sherman_morrison
from trainlab.optim.sharding import (
    all_reduce_mean_over_mesh,
    all_reduce_sum,
    gather_rows_together,
    gather_whole,
    is_sharded,
    layout_of,
    like,
    local,
    reshard,
    stacked_zeros,
)
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

    Under FSDP2 each rank keeps its shard of the window (a DTensor ``(ngrads, *shape)``) and of the direction;
    the only whole quantities are the new Gram row of each tensor, summed over the ranks in one all-reduce per
    step for the whole group, so the Gram matrices (replicated) and the solve are the same on every rank.

    ``momentum`` μ > 0 averages the directions, ``v ← μv + (1−μ)u`` with v starting at zero as in
    optim.py (so the first step is (1−μ)u, not u).
    """

    name = "scale_by_mfac"
    wide_state = frozenset({"gram"})
    hyperparameters = {"ngrads": 1024, "damp": 1e-5, "momentum": 0.0}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        m = group["ngrads"]
        # FSDP2: each rank keeps its shard of every window row, a DTensor of shape (ngrads, *param.shape)
        window = (
            stacked_zeros(m, param, param.dtype)
            if is_sharded(param)
            else torch.zeros(m, param.numel(), dtype=param.dtype, device=param.device)
        )
        return {
            "step": new_step_counter(),
            "grad_window": window,
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
        sharded = is_sharded(updates[0])
        if sharded:  # FSDP2: this rank's shards (a window row's shard is its gradient's shard, flattened)
            windows = [local(w).view(m, -1) for w in windows]
        flat = [local(u).reshape(-1) for u in updates]
        torch._foreach_copy_([w[row] for w in windows], flat)
        # bfloat16/float16 gradients are stored exactly, but their products are summed in float32: rounded to
        # 8 bits, the Gram matrix and the Woodbury correction lose the step (damp 1e-5 amplifies the error).
        wide = [w.to(_wide(w.dtype)) for w in windows]
        flat = [f.to(w.dtype) for f, w in zip(flat, wide, strict=True)]
        dots = [w @ f for w, f in zip(wide, flat, strict=True)]
        if sharded:  # partial Gram rows summed over the ranks: one all-reduce for the whole group
            dots = list(all_reduce_sum(torch.stack(dots), updates[0]).unbind(0))
        torch._foreach_copy_([g[row] for g in grams], dots)
        torch._foreach_copy_([g[:, row] for g in grams], dots)
        coef = woodbury_coefficients(sum(g.double() for g in grams), sum(d.double() for d in dots), damp, m)
        out = [torch.addmv(f, w.T, coef.to(w.dtype), alpha=-1) for w, f in zip(wide, flat, strict=True)]
        torch._foreach_div_(out, damp)
        out = [like(o.reshape(local(u).shape).to(u.dtype), u) for o, u in zip(out, updates, strict=True)]
        if group["momentum"] > 0:
            torch._foreach_lerp_(state["momentum_buffer"], out, 1 - group["momentum"])
            return list(state["momentum_buffer"]), state
        return out, state


def _fsdp_params_by_module() -> dict[int, dict[str, Tensor]]:
    """``id(module) -> {name: sharded parameter}`` for every module whose parameters FSDP2 (``fully_shard``)
    manages in this process. FSDP2 swaps each module's parameters for unsharded plain tensors while it runs, so a
    forward hook sees those, never the sharded DTensors an optimizer holds; this map (from FSDP2's per-module
    state, a torch internal) relates the two."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    out: dict[int, dict[str, Tensor]] = {}
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref
        group = getattr(state, "_fsdp_param_group", None) if isinstance(state, FSDPState) else None
        for fsdp_param in getattr(group, "fsdp_params", ()):
            info = fsdp_param._module_info
            out.setdefault(id(info.module), {})[info.param_name] = fsdp_param.sharded_param
    return out


class ShardAwareLayerObserver(LayerObserver):
    """A `LayerObserver` that also records layers whose watched weight is an FSDP2 (``fully_shard``) parameter.

    During its forward such a layer holds FSDP2's unsharded copy of the weight; the statistics are recorded
    for that copy and filed under the sharded parameter as well (with the sharded bias), so an optimizer looks
    them up by the parameters it holds. Each rank's statistics are its own batch's; `PreconditionMKOR` averages
    them over the ranks before a refresh."""

    def __init__(self, clipping: float = 100.0) -> None:
        super().__init__(clipping)
        self._sharded: set[int] = set()  # ids of watched DTensor parameters
        self._by_module: dict[int, dict[str, Tensor]] = {}

    def watch(self, params: Iterable[Tensor]) -> None:
        params = list(params)
        super().watch(params)
        self._sharded.update(id(p) for p in params if is_sharded(p))

    def _record(self, module: nn.Module, args: tuple, output: object) -> None:
        weight = getattr(module, "weight", None)
        sharded = None
        if self._sharded and isinstance(weight, Tensor) and id(weight) not in self.watched:
            if id(module) not in self._by_module:  # a module not seen yet: FSDP2 may have wrapped it since
                self._by_module = {**self._by_module, id(module): {}, **_fsdp_params_by_module()}
            sharded = self._by_module[id(module)]
            if id(sharded.get("weight")) in self._sharded:
                self.watched.add(id(weight))  # the unsharded copy stands for the sharded weight
            else:
                sharded = None
        super()._record(module, args, output)
        stats = self.layers.get(id(weight))
        if sharded is not None and stats is not None:
            self.layers[id(sharded["weight"])] = stats
            stats.bias = sharded.get("bias")
            if stats.bias is not None:
                self.bias_of[id(stats.bias)] = id(sharded["weight"])


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
    hyperparameters = {"inv_freq": 10, "stat_decay": 0.95, "stabilization_factor": 0.1, "warmup_steps": 0}

    def __init__(self, observer: LayerObserver) -> None:
        self.observer = observer
        self.directions: dict[int, Tensor] = {}
        self.shared: dict[int, tuple[Tensor, Tensor]] = {}  # FSDP2: rank-averaged (ā, ḡ) by id(weight)

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
        rows, cols = 0, 0
        if stats:  # (out, in ...) from the (global) shape: a transposed (in, out) weight swaps its sides
            shape = (param.shape[1], param.shape[0]) if stats.transposed else tuple(param.shape)
            rows, cols = shape[0], math.prod(shape[1:]) + (stats.bias is not None)
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

    def refreshes(self, state: Mapping[str, Tensor], group: Mapping[str, Any]) -> bool:
        """Whether the layer with this (weight's) state refreshes its factors at its next `precondition`."""
        t = int(state["step"])
        return t % group["inv_freq"] == 0 or t < group["warmup_steps"]

    def share_statistics(self, layers: list[tuple[Tensor, Mapping[str, Tensor], Mapping[str, Any]]]) -> None:
        """FSDP2: average ā and ḡ over the ranks (each saw its own batch) for the sharded layers of
        ``(weight, state, group)`` that refresh at their next `precondition`, in one all-reduce for all of them,
        so every rank refreshes the factors of a single process that saw every rank's batch."""
        due = [w for w, st, g in layers if is_sharded(w) and self.refreshes(st, g)]
        stats = [self.observer.layers[id(w)] for w in due]
        if not due:
            return
        if any(st.inputs is None or st.output_grads is None for st in stats):
            raise RuntimeError("mkor found no layer statistics: run forward and backward before step")
        vectors = [v for st in stats for v in (st.inputs, st.output_grads)]
        sizes = [v.numel() for v in vectors]
        dtype = torch.promote_types(vectors[0].dtype, torch.float32)
        joined = all_reduce_mean_over_mesh(torch.cat([v.to(dtype) for v in vectors]), due[0])
        parts = joined.split(sizes)
        for i, w in enumerate(due):
            self.shared[id(w)] = (parts[2 * i], parts[2 * i + 1])

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
        sharded = is_sharded(weight)
        if sharded and unscale is not None:
            raise ValueError("mkor cannot unscale layer statistics of FSDP2 (DTensor) parameters: no GradScaler")
        refresh = self.refreshes(state, group)  # a CPU counter: no device sync
        state["step"].add_(1)
        left, right, reset = state["left_inv"], state["right_inv"], state["reset"]
        if refresh:
            if stats.inputs is None or stats.output_grads is None:
                raise RuntimeError("mkor found no layer statistics: run forward and backward before step")
            inputs, output_grads = stats.inputs, stats.output_grads
            if sharded:
                if id(weight) not in self.shared:
                    raise RuntimeError("mkor: call share_statistics before preconditioning FSDP2 layers")
                inputs, output_grads = self.shared.pop(id(weight))
            if unscale is not None:  # the clamp of the unscaled rows, exact unless it cut them
                clip = self.observer.clipping
                unclamped = stats.output_grads_unclamped * unscale
                exact = stats.output_grads_peak * unscale <= clip
                output_grads = torch.where(exact, unclamped, unclamped.clamp(-clip, clip))
            self._refresh(left, inputs, reset, group)
            self._refresh(right, output_grads, reset, group)
            too_big = torch.maximum(left.abs().max(), right.abs().max()) > 2
            reset.copy_(~reset.bool() & too_big)
        wgrad, bgrad = weight.grad, None if bias is None else bias.grad
        if sharded:  # FSDP2: the layer's whole [∇W | ∇b], one all-gather (each rank computes the same step)
            joined = bias is not None and not stats.transposed  # a Conv1D's (in, out) weight shards its inputs
            wgrad, *rest = gather_rows_together([wgrad, bgrad] if joined else [wgrad])
            if bias is not None:
                bgrad = rest[0] if rest else gather_whole([bgrad])[0][0]
        dw = wgrad.t() if stats.transposed else wgrad.reshape(weight.shape[0], -1)
        db = (bgrad if bias is not None else dw.new_zeros(dw.shape[0])).reshape(-1, 1)
        pre = right @ torch.cat([dw, db.to(dw.dtype)], 1) @ left if stats.bias is not None else right @ dw @ left
        parts = [pre[:, : dw.shape[1]]] + ([pre[:, -1]] if bias is not None else [])
        grads = [dw] + ([db] if bias is not None else [])
        # Keep the gradient's norm (‖∇W‖ + ‖∇b‖)/(‖U_W‖ + ‖U_b‖); a zero gradient stays zero.
        scale = torch.nan_to_num(sum(torch._foreach_norm(grads)) / sum(torch._foreach_norm(parts)), nan=1.0)
        direction = parts[0] * scale
        direction = direction.t() if stats.transposed else direction.reshape(weight.shape)
        self.directions[id(weight)] = reshard(direction, layout_of(weight))  # a sharded weight: its own slice
        if bias is not None:
            self.directions[id(bias)] = reshard((parts[1] * scale).reshape(bias.shape), layout_of(bias))

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        return [self.directions.pop(id(p), u) for p, u in zip(params, updates, strict=True)], state

    def __getstate__(self) -> dict[str, Any]:
        # The observer hooks into this process's modules; the optimizer that owns it attaches a new one.
        return {**self.__dict__, "observer": None, "directions": {}}
