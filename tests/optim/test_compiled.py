"""Compiled chains (``create(..., compile=True)``, trainlab.optim.compiled): each elementwise recipe equals its eager
chain after several steps (float32, tiny parameters: one compiled graph per recipe); an LR schedule never recompiles;
state_dict round-trips; chains that cannot compile, or whose compilation fails, run eagerly and say why; the global
default; the eager apply contract (Adam writes into the parameters) against the update-then-add path."""

import copy
import math

import pytest
import torch

from trainlab.optim import ChainOptimizer, GradientTransform, chain, compile_default, create, set_compile_default
from trainlab.optim import compiled as compiled_module
from trainlab.optim.transform import compile_refusal_of, has_apply
from trainlab.optim.transforms import (
    ScaleByAdam,
    ScaleByAdamWithResets,
    ScaleByDiffGrad,
    decoupled_weight_decay,
    scale_by_spam_adam,
)

SHAPES = [(4, 8), (8,)]  # both contiguous, flattened to 1-D: one compiled graph serves a chain's parameters
STEPS = 6

# Recipes and settings under which every branch runs within STEPS: decay, clipping, resets, warmup, Nesterov.
RECIPES = {
    "adamw": {},
    "sgd": {"nesterov": True, "weight_decay": 0.1},
    "lion": {"weight_decay": 0.1},
    "lion-k": {"k": "l2", "weight_decay": 0.1},
    "diffgrad": {"weight_decay": 0.1},
    "spam": {"n_acc": 2, "reset_interval": 3, "warmup_steps": 1, "weight_decay": 0.1, "theta": 2.0},
    "stable-spam": {"reset_interval": 3, "weight_decay": 0.1},
    "orthograd": {},
}
# Largest difference from eager, in ulps, of the parameters and the state after STEPS steps. Parameters are
# compared in ulps of max(|p|, lr): where |p| < lr the unit is the step's own rounding (the adam ratio, 1/(c·√v + e)·m,
# can round once differently in the vectorized loop). Stable-SPAM's gradient norm is a reduction summed in another
# order than eager's (inductor's vector lanes): its normalized gradient, and so its moments, are a rounding or two
# apart (measured: 2 ulps in m, 4 in v after 6 steps).
BOUND = {"stable-spam": 4}
STATE_BOUND = {"stable-spam": 4}  # every other recipe's state is bitwise eager's


def _grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _build(name: str, compile: bool, **hp) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    generator = torch.Generator().manual_seed(100)
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in SHAPES]
    return params, create(name, params, compile=compile, **hp)


def _steps(params, optimizer, steps, first=0) -> None:
    for k in range(first, first + steps):
        for p, g in zip(params, _grads(k), strict=True):
            p.grad = g
        optimizer.step()


def _ulps(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """The largest difference, in units in the last place (of a's dtype) of the larger magnitude of each pair, or
    of ``floor`` where that is larger."""
    digits = 1 - int(math.log2(torch.finfo(a.dtype).eps))  # 24 for float32, 53 for float64
    a, b = a.detach().double(), b.detach().double()
    _, exponent = torch.frexp(torch.maximum(a.abs(), b.abs()).clamp_min(floor))
    ulp = torch.ldexp(torch.ones_like(a), exponent - digits).clamp_min(2.0**-149)
    return float(((a - b).abs() / ulp).max())


@pytest.mark.slow  # one inductor compile per recipe (seconds each; cached on disk after the first run)
@pytest.mark.parametrize("name", list(RECIPES))
def test_compiled_recipe_equals_its_eager_chain(name):
    hp = RECIPES[name]
    eager_params, eager = _build(name, False, **hp)
    params, optimizer = _build(name, True, **hp)
    _steps(eager_params, eager, STEPS)
    _steps(params, optimizer, STEPS)
    assert optimizer.compile_fallback == {}
    assert optimizer._runners["default"][1]._seen  # it ran compiled
    head = {"default": "orthogonalize_gradient: no traced form"} if name == "orthograd" else {}
    assert optimizer.compile_eager_head == head
    for p, q in zip(eager_params, params, strict=True):
        lr = optimizer.param_groups[0]["lr"]
        assert _ulps(p, q, floor=lr) <= BOUND.get(name, 1), (name, _ulps(p, q, floor=lr))
        state, compiled_state = eager.state[p], optimizer.state[q]
        assert state.keys() == compiled_state.keys()
        for key, value in state.items():
            other = compiled_state[key]
            assert (value.dtype, value.device, value.shape) == (other.dtype, other.device, other.shape), key
            if value.is_floating_point():
                assert _ulps(value, other) <= STATE_BOUND.get(name, 0), (name, key, _ulps(value, other))
            else:
                assert torch.equal(value, other), key


@pytest.mark.slow  # shares the adamw graph's compilation with the test above (inductor's cache)
def test_a_schedule_never_recompiles_and_state_dict_round_trips():
    eager_params, eager = _build("adamw", False, weight_decay=0.1)
    params, optimizer = _build("adamw", True, weight_decay=0.1)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1 / (1 + k)) for o in (eager, optimizer)]
    _steps(eager_params, eager, 1)
    _steps(params, optimizer, 1)  # compiles once
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(1, 10):
            for o, schedule in zip((eager, optimizer), schedules, strict=True):
                schedule.step()
                if k == 5:  # betas and weight decay are host scalars too
                    o.param_groups[0]["betas"] = (0.8, 0.99)
                    o.param_groups[0]["weight_decay"] = 0.2
            _steps(eager_params, eager, 1, first=k)
            _steps(params, optimizer, 1, first=k)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 10)
    for p, q in zip(eager_params, params, strict=True):
        assert _ulps(p, q, floor=1e-3) <= 1
        for key, value in eager.state[p].items():
            assert torch.equal(value, optimizer.state[q][key]), key
    # state_dict: the same keys, dtypes and host step counters as eager; a reloaded compiled optimizer goes on
    # bitwise with the original
    saved, eager_saved = optimizer.state_dict(), eager.state_dict()
    for index, values in eager_saved["state"].items():
        for key, value in values.items():
            assert (value.dtype, value.device) == (saved["state"][index][key].dtype, saved["state"][index][key].device)
    twin = [p.detach().clone().requires_grad_() for p in params]
    reloaded = create("adamw", twin, compile=True)
    reloaded.load_state_dict(saved)
    with torch._dynamo.config.patch(error_on_recompile=True):  # its own cache, but inductor's code is cached
        _steps(params, optimizer, 2, first=10)
    _steps(twin, reloaded, 2, first=10)
    for p, q in zip(params, twin, strict=True):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, reloaded.state[q][key]), key
    # deepcopy (and pickle) leave the compiled functions behind; the copy compiles its own and goes on alike (of
    # the reloaded optimizer: an LR scheduler's step wrapper would still point a copy at the original)
    copied = copy.deepcopy(reloaded)
    assert copied.compiled and "_runners" not in copied.__getstate__()
    copied_params = copied.param_groups[0]["params"]
    _steps(twin, reloaded, 1, first=12)
    _steps(copied_params, copied, 1, first=12)
    for p, q in zip(twin, copied_params, strict=True):
        assert torch.equal(p, q)
    assert copied.compile_fallback == {} and copied._runners["default"][1]._seen


def test_a_chain_without_a_traced_form_runs_eagerly_and_says_why():
    def run(compile):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(8, 4, generator=generator).requires_grad_()]  # matrices only: Muon's chain
        optimizer = create("muon", params, compile=compile)
        _steps_matrix(params, optimizer)
        return params, optimizer

    def _steps_matrix(params, optimizer):
        for k in range(2):
            params[0].grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
            optimizer.step()

    with pytest.warns(RuntimeWarning, match="chain 'muon' runs eagerly") as caught:
        params, optimizer = run(True)
    assert len([w for w in caught if "runs eagerly" in str(w.message)]) == 1  # once, at construction
    assert "no traced form" in optimizer.compile_fallback["muon"]
    eager_params, _ = run(False)
    assert torch.equal(params[0], eager_params[0])


def test_a_failed_compilation_runs_eagerly_with_the_reason_and_steps_once(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C compiler found")

        return call

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    eager_params, eager = _build("stable-spam", False)
    params, optimizer = _build("stable-spam", True)
    with pytest.warns(RuntimeWarning, match=r"compilation failed: RuntimeError: no C compiler found"):
        _steps(params, optimizer, 1)
    _steps(params, optimizer, 2, first=1)  # eager from now on, no second warning (pytest turns warnings on)
    _steps(eager_params, eager, 3)
    assert optimizer.compile_fallback == {"default": "compilation failed: RuntimeError: no C compiler found"}
    for p, q in zip(eager_params, params, strict=True):
        assert torch.equal(p, q)
        for key, value in eager.state[p].items():  # the host step counters advanced once per step
            assert torch.equal(value, optimizer.state[q][key]), key


def test_compile_default_and_bad_arguments():
    assert compile_default() is False
    set_compile_default(True)
    try:
        assert create("adamw", [torch.zeros(2, requires_grad=True)]).compiled is True
        assert ChainOptimizer([torch.zeros(2, requires_grad=True)], chain(ScaleByAdam()), lr=0.1).compiled is True
        assert create("adamw", [torch.zeros(2, requires_grad=True)], compile=False).compiled is False
        assert isinstance(create("torch-adamw", [torch.zeros(2, requires_grad=True)]), torch.optim.AdamW)
    finally:
        set_compile_default(False)
    assert create("adamw", [torch.zeros(2, requires_grad=True)]).compiled is False
    with pytest.raises(ValueError, match="not a transform-chain optimizer"):
        create("torch-adamw", [torch.zeros(2, requires_grad=True)], compile=True)
    with pytest.raises(TypeError, match="compile must be a bool"):
        create("adamw", [torch.zeros(2, requires_grad=True)], compile="yes")
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_compile_default(1)


def test_subclasses_that_change_update_inherit_neither_traced_form_nor_apply():
    class OtherAdam(ScaleByAdam):
        def update(self, updates, state, params, group):
            return super().update(updates, state, params, group)

    assert compile_refusal_of(OtherAdam()) == "OtherAdam overrides update() without a traced form"
    assert not has_apply(OtherAdam())
    assert has_apply(_SignStep()) and has_apply(chain(decoupled_weight_decay(), _SignStep()))
    assert not has_apply(ScaleByAdam())  # eager Adam keeps update-then-add (see docs/optimizers.md)
    for transform in (ScaleByDiffGrad(), ScaleByAdamWithResets(), scale_by_spam_adam()):
        assert compile_refusal_of(transform) == ""  # each defines its own traced form

    class OtherSign(_SignStep):
        def update(self, updates, state, params, group):
            return super().update(updates, state, params, group)

    assert not has_apply(OtherSign())  # an apply written for other arithmetic is not inherited


class _SignStep(GradientTransform):
    """A test transform with the apply contract: u = sign(g + m), m <- g; apply writes p -= lr·u itself."""

    name = "sign_step"
    per_parameter = True

    def init(self, param, group):
        return {"memory": torch.zeros_like(param)}

    def update(self, updates, state, params, group):
        out = torch._foreach_add(updates, state["memory"])
        torch._foreach_sign_(out)
        torch._foreach_copy_(state["memory"], updates)
        return out, state

    def apply(self, updates, state, params, group):
        out, state = self.update(updates, state, params, group)
        torch._foreach_add_(params, out, alpha=-group["lr"])
        self.applied += 1
        return state


def test_the_apply_contract_lets_the_last_transform_write_the_parameters():
    start = [torch.randn(6, 4), torch.randn(4)]
    runs = []
    for applies in (True, False):
        transform = _SignStep()
        transform.applied = 0
        if not applies:
            transform.apply = None  # the update-then-add path
        params = [p.clone().requires_grad_() for p in start]
        optimizer = ChainOptimizer(params, chain(decoupled_weight_decay(), transform), lr=0.1, weight_decay=0.5)
        assert has_apply(optimizer.chains["default"]) is applies
        for k in range(3):
            generator = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        runs.append((params, optimizer, transform.applied))
    (new, new_opt, applied), (old, old_opt, _) = runs
    assert applied == 3  # one apply per step: the two parameters are one cache-sized slice
    for p, q in zip(new, old, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(new_opt.state[p]["sign_step.memory"], old_opt.state[q]["sign_step.memory"])


def test_spam_clipping_reads_step_counters_without_item(monkeypatch):
    params = [torch.randn(4, 4).requires_grad_()]
    optimizer = create("spam", params, n_acc=2)

    def item(self):
        raise AssertionError(".item() in an optimizer step")

    monkeypatch.setattr(torch.Tensor, "item", item)
    for _ in range(3):
        params[0].grad = torch.randn(4, 4)
        optimizer.step()
    assert optimizer.state[params[0]]["clip_spikes.step"] == 3
