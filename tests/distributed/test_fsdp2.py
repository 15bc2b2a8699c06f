"""trainlab optimizers on FSDP2 (fully_shard, DTensor parameters): 2 gloo processes, forked once.

Every optimizer matches single-process training over 3 steps. First-order ones are compared with one process on the
concatenated batches. The projection and window methods (galore, frugal, gradnorm-lorp, cosmos, mfac) are compared
with one process that averages the two ranks' gradients as FSDP2's reduce-scatter does: their SVDs and solves turn
the last-bit difference of a mean over 12 samples vs the mean of two means over 6 into 1e-3 after 3 steps (nearly
equal singular values), which says nothing about sharding. mkor reads layer statistics of one forward pass, so it is
compared on the concatenated batches. Collectives per step are counted with CommDebugMode."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from two_ranks import run_on_two_ranks

from trainlab import optim

RUNS = (
    "adamw",
    "auon",
    "diffgrad",
    "lion",
    "lion-k",
    "muon",
    "orthograd",
    "sgd",
    "spam",
    "stable-spam",
    "torch-adamw",
    "torch-sgd",
)
# Hyperparameters that make each method's sharded path do its work within 3 steps: a rank below min(m, n) and a
# refresh at steps 1 and 3; a window shorter than the run (it wraps); factor refreshes at steps 1 and 3.
STATEFUL = {
    "galore": {"rank": 4, "update_proj_gap": 2, "lr": 0.01},
    "frugal": {"density": 0.5, "update_gap": 2, "lr": 0.01},
    "frugal-random": {"density": 0.5, "update_gap": 2, "lr": 0.01, "projection": "random"},
    "gradnorm-lorp": {"rank": 4, "update_proj_gap": 2, "lr": 0.01},
    "cosmos": {"rank": 4, "lr": 0.01},
    "mfac": {"ngrads": 2, "damp": 0.1, "lr": 0.01},
    "mkor": {"inv_freq": 2, "lr": 0.01},
}
AVERAGED = ("galore", "frugal", "frugal-random", "gradnorm-lorp", "cosmos", "mfac")


def _create(name, params):
    hp = STATEFUL.get(name, {})
    return optim.create(name.removesuffix("-random"), params, **hp)


def _model():  # 5 outputs: the last layer's rows shard unevenly (3 + 2)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


def _batch(rank, step):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 5, generator=g)


def _train(name, model, rank=None, steps=3, averaged=False):
    """``rank`` None: one process, on both ranks' batches at once, or (``averaged``) the mean of the gradients of
    each rank's batch, the mean FSDP2's reduce-scatter takes."""
    torch.manual_seed(1)  # frugal-random's seed: drawn on each rank alike (and broadcast from rank 0)
    opt = _create(name, model.parameters())
    for step in range(steps):
        opt.zero_grad()
        if rank is not None:
            nn.functional.mse_loss(model(_batch(rank, step)[0]), _batch(rank, step)[1]).backward()
        elif averaged:
            grads = []
            for r in range(2):
                model.zero_grad()
                nn.functional.mse_loss(model(_batch(r, step)[0]), _batch(r, step)[1]).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
                p.grad = (g0 + g1) / 2
        else:  # (FSDP averages the two ranks' gradients)
            x, y = (torch.cat(t) for t in zip(*(_batch(r, step) for r in range(2)), strict=True))
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def _sharded():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _replicated_bytes(opt):
    """Bytes of the plain (not DTensor) tensors in an optimizer's state: each rank holds all of them."""
    from torch.distributed.tensor import DTensor

    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
    )


def _state_bytes(rank):
    """(sum over ranks of state_bytes after one sharded AdamW step, one process's state_bytes + the second rank's
    per-parameter step counters): each rank holds its shards of the moments and its own counters."""
    counts = []
    for model, batch in ((_sharded(), _batch(rank, 0)), (_model(), _batch(0, 0))):
        opt = optim.create("adamw", model.parameters())
        nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
        opt.step()
        counts.append(optim.state_bytes(opt))
    total = torch.tensor(float(counts[0]))
    dist.all_reduce(total)
    return float(total), float(counts[1] + 4 * len(list(_model().parameters())))


def _dcp_resume(name, rank, folder):
    """Max |difference| between 2 straight sharded steps and 1 step, a torch.distributed.checkpoint save/load into
    fresh objects, 1 more step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def step(model, opt, s):
        opt.zero_grad()
        nn.functional.mse_loss(model(_batch(rank, s)[0]), _batch(rank, s)[1]).backward()
        opt.step()

    model = _sharded()
    opt = _create(name, model.parameters())
    step(model, opt, 0)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)
    step(model, opt, 1)
    fresh = _sharded()
    fresh_opt = _create(name, fresh.parameters())
    if name == "mkor":  # its state needs a forward and backward (layer statistics) before get_optimizer_state_dict
        step(fresh, fresh_opt, 2)  # creates every state tensor; the load below replaces them all
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=folder)
    fresh.load_state_dict(state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    step(fresh, fresh_opt, 1)
    return max(
        float((p.full_tensor() - q.full_tensor()).detach().abs().max())
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True)
    )


def _collectives_per_step(name, rank, steps=2):
    """Collectives each of ``steps`` optimizer steps issues on sharded parameters, by kind (the last one: state
    exists; with ``steps`` 3, the steps of the STATEFUL settings: refresh, none, refresh)."""
    from torch.distributed.tensor.debug import CommDebugMode

    model = _sharded()
    opt = _create(name, model.parameters())
    counts = []
    for step in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(_batch(rank, step)[0]), _batch(rank, step)[1]).backward()
        with CommDebugMode() as comm:
            opt.step()
        counts.append({str(k).rsplit(".", 1)[-1]: v for k, v in comm.get_comm_counts().items()})
    return counts[-1] if steps == 2 else counts


def _compiled_on_fsdp2(rank):
    """compile=True on sharded parameters: (the fallback reason, the warnings, |compile=True - eager| after 3
    steps)."""
    eager, _ = _train("adamw", _sharded(), rank)
    model = _sharded()
    torch.manual_seed(1)
    opt = optim.create("adamw", model.parameters(), compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(_batch(rank, step)[0]), _batch(rank, step)[1]).backward()
            opt.step()
    diff = max(
        float((p.full_tensor() - q.full_tensor()).abs().max())
        for p, q in zip(model.parameters(), eager.parameters(), strict=True)
    )
    return opt.compile_fallback.get("default", ""), [str(w.message) for w in caught], diff


def _compute(rank, tmp):
    results = {}
    for name in RUNS + tuple(STATEFUL):
        ref, ref_opt = _train(name, _model(), averaged=name in AVERAGED)
        sharded, opt = _train(name, _sharded(), rank)
        results[name] = max(
            float((p.full_tensor() - q).detach().abs().max())
            for p, q in zip(sharded.parameters(), ref.parameters(), strict=True)
        )
        if name in STATEFUL:  # summed over ranks vs one process + each extra rank's replicated state
            total = torch.tensor(float(optim.state_bytes(opt)))
            dist.all_reduce(total)
            expected = optim.state_bytes(ref_opt) + _replicated_bytes(opt)
            results[f"state bytes {name}"] = (float(total), float(expected))
    results["state bytes"] = _state_bytes(rank)
    results["compile"] = _compiled_on_fsdp2(rank)
    results["collectives"] = {
        name: _collectives_per_step(name, rank) for name in ("adamw", "muon", "orthograd", "stable-spam")
    }
    results["stateful collectives"] = {name: _collectives_per_step(name, rank, 3) for name in STATEFUL}
    for name in ("adamw", "muon", "stable-spam", *STATEFUL):
        results[f"dcp {name}"] = _dcp_resume(name, rank, os.path.join(tmp, f"dcp-{name}"))
    return results


@pytest.fixture(scope="module")
def results():
    return run_on_two_ranks(_compute)


@pytest.mark.parametrize("name", RUNS + tuple(STATEFUL))
def test_optimizer_on_fsdp2_matches_one_process(results, name):
    # largest entries of the parameters 0.23-0.35: 1e-6 is a few float32 ulps of them (relative ~4e-6)
    assert results[name] <= 1e-6, f"{name}: max |FSDP2 - single process| = {results[name]:.2e}"


def test_compile_true_on_fsdp2_steps_eagerly_and_says_why(results):
    reason, caught, diff = results["compile"]
    assert "FSDP2 (DTensor) parameters" in reason
    assert len(caught) == 1 and "runs eagerly" in caught[0]  # warned once, no failed compilation attempted
    assert diff == 0.0  # the eager chain's step exactly


def test_state_bytes_count_this_ranks_shards(results):
    summed, expected = results["state bytes"]
    assert summed == expected


@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_bytes_of_sharded_and_replicated_state(results, name):
    # DTensor state counts its local shard (summing to one process's bytes), plain state counts on every rank
    summed, expected = results[f"state bytes {name}"]
    assert summed == expected


@pytest.mark.parametrize("name", ["adamw", "muon", "stable-spam", *STATEFUL])
def test_sharded_checkpoint_through_torch_distributed_checkpoint_resumes_bitwise(results, name):
    assert results[f"dcp {name}"] == 0.0


def test_muon_gathers_each_matrix_once_per_step(results):
    # 3 Linear weights: one all-gather each (Newton-Schulz on DTensors issued 43 collectives); AdamW needs none;
    # orthograd sums its shards' dot products and norms: two all-reduces for the 6 tensors (was 36 collectives);
    # stable-spam's AdaClip peaks (max) and AdaGN norms (sum of squares): one all-reduce each (was 45 implicit).
    assert results["collectives"] == {
        "adamw": {},
        "muon": {"all_gather_into_tensor": 3},
        "orthograd": {"allreduce_": 2},
        "stable-spam": {"allreduce_": 2},
    }


# Per step of the STATEFUL settings (refresh, no refresh, refresh) on 3 Linear layers (+ biases, AdamW-routed for
# the projection methods): one all-gather per matrix (gradnorm-lorp: weight and gradient in one; its first step
# also gathers each weight once for its gains), mfac one all-reduce of the new Gram rows for all 6 tensors, mkor
# one all-gather of each layer's [dW | db] plus, on refresh steps, one all-reduce of every layer's statistics.
GATHER3 = {"all_gather_into_tensor": 3}
EXPECTED_COLLECTIVES = {
    "galore": [GATHER3] * 3,
    "frugal": [GATHER3] * 3,
    "frugal-random": [{"all_gather_into_tensor": 3, "broadcast_": 3}, GATHER3, GATHER3],
    "gradnorm-lorp": [{"all_gather_into_tensor": 6}, GATHER3, GATHER3],
    "cosmos": [GATHER3] * 3,
    "mfac": [{"allreduce_": 1}] * 3,
    "mkor": [{"all_gather_into_tensor": 3, "allreduce_": 1}, GATHER3, {"all_gather_into_tensor": 3, "allreduce_": 1}],
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_stateful_methods_gather_each_matrix_once_per_step(results, name):
    assert results["stateful collectives"][name] == EXPECTED_COLLECTIVES[name]
