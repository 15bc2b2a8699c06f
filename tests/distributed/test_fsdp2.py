"""trainlab optimizers on FSDP2 (fully_shard, DTensor parameters): 2 gloo processes, forked once.

Optimizers that run match single-process training on the concatenated batches; the ones that cannot handle
sharded parameters refuse at construction with an error naming FSDP2 (not a mixed Tensor/DTensor error at the
first step)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

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
REFUSES = ("galore", "frugal", "gradnorm-lorp", "cosmos", "mfac", "mkor")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(rank, step):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def _train(name, model, rank=None, steps=3):
    opt = optim.create(name, model.parameters())
    for step in range(steps):
        if rank is None:  # one process: both ranks' batches at once (FSDP averages the two ranks' gradients)
            x, y = (torch.cat(t) for t in zip(*(_batch(r, step) for r in range(2)), strict=True))
        else:
            x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _sharded():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


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
    opt = optim.create(name, model.parameters())
    step(model, opt, 0)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)
    step(model, opt, 1)
    fresh = _sharded()
    fresh_opt = optim.create(name, fresh.parameters())
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=folder)
    fresh.load_state_dict(state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    step(fresh, fresh_opt, 1)
    return max(
        float((p.full_tensor() - q.full_tensor()).detach().abs().max())
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True)
    )


def _collectives_per_step(name, rank):
    """Collectives one optimizer step issues on sharded parameters (second step: state exists), by kind."""
    from torch.distributed.tensor.debug import CommDebugMode

    model = _sharded()
    opt = optim.create(name, model.parameters())
    for step in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(_batch(rank, step)[0]), _batch(rank, step)[1]).backward()
        with CommDebugMode() as comm:
            opt.step()
    return {str(k).rsplit(".", 1)[-1]: v for k, v in comm.get_comm_counts().items()}


def _worker(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = {}
        for name in RUNS:
            ref = _train(name, _model())
            sharded = _train(name, _sharded(), rank)
            results[name] = max(
                float((p.full_tensor() - q).detach().abs().max())
                for p, q in zip(sharded.parameters(), ref.parameters(), strict=True)
            )
        results["state bytes"] = _state_bytes(rank)
        results["collectives"] = {name: _collectives_per_step(name, rank) for name in ("adamw", "muon")}
        for name in ("adamw", "muon", "stable-spam"):
            results[f"dcp {name}"] = _dcp_resume(name, rank, os.path.join(os.path.dirname(out), f"dcp-{name}"))
        for name in REFUSES:
            try:
                optim.create(name, _sharded().parameters())
                results[name] = "constructed"
            except ValueError as e:
                results[name] = str(e)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    import torch._dynamo  # noqa: F401  (imported on first use by FSDP: once here, not in each child)

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.start_processes(_worker, args=(os.path.join(tmp, "store"), out), nprocs=2, start_method="fork")
        return torch.load(out, weights_only=True)


@pytest.mark.parametrize("name", RUNS)
def test_optimizer_on_fsdp2_matches_one_process(results, name):
    assert results[name] <= 1e-6, f"{name}: max |FSDP2 - single process| = {results[name]:.2e}"


@pytest.mark.parametrize("name", REFUSES)
def test_optimizer_that_cannot_shard_refuses_at_construction_naming_fsdp2(results, name):
    assert "FSDP2" in results[name] and "DTensor" in results[name], results[name]


def test_state_bytes_count_this_ranks_shards(results):
    summed, expected = results["state bytes"]
    assert summed == expected


@pytest.mark.parametrize("name", ["adamw", "muon", "stable-spam"])
def test_sharded_checkpoint_through_torch_distributed_checkpoint_resumes_bitwise(results, name):
    assert results[f"dcp {name}"] == 0.0


def test_muon_gathers_each_matrix_once_per_step(results):
    # 3 Linear weights: one all-gather each (Newton-Schulz on DTensors issued 43 collectives); AdamW needs none.
    assert results["collectives"] == {"adamw": {}, "muon": {"all_gather_into_tensor": 3}}
