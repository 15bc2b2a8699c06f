"""The compression hook under real DDP: 2 gloo processes on CPU, spawned once for every scenario below.

Each rank trains a small MLP on its own batches with tiny buckets (several buckets, rebuilt after the first step);
rank 0 collects both ranks' parameters and the hook's counters, and the tests read them."""

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from two_ranks import run_on_two_ranks

from trainlab.distributed import register_compression_hook

STEPS = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 6, generator=g), torch.randint(3, (8,), generator=g)


def _train(rank, steps, hook=None, start=0, state=None):
    """(ddp, optimizer, hook state) after ``steps`` SGD steps from ``start``, optionally resumed from ``state``."""
    ddp = DDP(_model(), bucket_cap_mb=0.0005)  # ~500 bytes: several buckets
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    hs = register_compression_hook(ddp, hook[0], feedback=hook[1], **hook[2]) if hook else None
    if state is not None:
        ddp.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        hs.load_state_dict(state["hook"])
    for step in range(start, start + steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return ddp, opt, hs


def _params(ddp):
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    return torch.stack(both)


def _checkpoint_roundtrip(rank, hook):
    """4 steps straight vs 2 steps, a weights_only checkpoint into fresh objects, 2 more steps."""
    straight = _params(_train(rank, 4, hook)[0])
    ddp, opt, hs = _train(rank, 2, hook)
    buf = io.BytesIO()
    torch.save({"model": ddp.module.state_dict(), "optimizer": opt.state_dict(), "hook": hs.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed, _, hs2 = _train(rank, 2, hook, start=2, state=state)
    return straight, _params(resumed), sorted(hs.state_dict())


SCENARIOS = {
    "identity-none": ("identity", "none", {}),
    "identity-ef": ("identity", "ef", {}),
    "identity-ef21": ("identity", "ef21", {}),
    "topk-ef21": ("topk", "ef21", {"ratio": 0.1}),
    "topk-none": ("topk", "none", {"ratio": 0.1}),
    "sign-ef": ("sign", "ef", {}),
    "sketch-none": ("count-sketch", "none", {"ratio": 0.125}),
    "topk-ef21w": ("topk", "ef21-w", {"ratio": 0.1, "smoothness": [1.0, 3.0]}),
}


def _compute(rank, tmp):
    results = {"plain": _params(_train(rank, STEPS)[0])}
    for name, hook in SCENARIOS.items():
        ddp, _, hs = _train(rank, STEPS, hook)
        results[name] = _params(ddp)
        results[name + ".bytes"] = torch.tensor([hs.bytes_sent, hs.dense_bytes])
    results["checkpoint"] = _checkpoint_roundtrip(rank, SCENARIOS["topk-ef21"])
    return results


@pytest.fixture(scope="module")
def results():
    return run_on_two_ranks(_compute)


def _numel():
    return sum(p.numel() for p in _model().parameters())


@pytest.mark.parametrize("name", ["identity-none", "identity-ef", "identity-ef21"])
def test_identity_schemes_equal_plain_allreduce_bitwise(results, name):
    assert torch.equal(results[name], results["plain"])
    sent, dense = results[name + ".bytes"].tolist()
    assert sent == dense == STEPS * _numel() * 4


@pytest.mark.parametrize("name", ["topk-ef21", "topk-none", "sign-ef", "sketch-none", "topk-ef21w"])
def test_compressed_runs_keep_ranks_in_sync_and_differ_from_plain(results, name):
    params = results[name]
    assert torch.equal(params[0], params[1])
    assert not torch.equal(params, results["plain"])
    assert torch.isfinite(params).all()


def test_bytes_sent_match_each_compressor_payload(results):
    shapes = [p.numel() for p in _model().parameters()]
    dense = STEPS * sum(shapes) * 4
    topk = sum(max(1, -(-n // 10)) * 8 for n in shapes)  # ceil(0.1 n) values + int32 indices
    sign = sum(-(-n // 8) + 4 for n in shapes)
    sketch = sum(-(-n // 8) * 4 for n in shapes)
    expect = {
        "topk-none": STEPS * topk,
        "topk-ef21": sum(shapes) * 4 + (STEPS - 1) * topk,  # EF21's first round is dense
        "sign-ef": STEPS * sign,
        "sketch-none": STEPS * sketch,
    }
    for name, sent in expect.items():
        assert results[name + ".bytes"].tolist() == [sent, dense], name


def test_feedback_state_survives_a_checkpoint_bitwise_and_is_keyed_by_parameter_name(results):
    straight, resumed, keys = results["checkpoint"]
    assert torch.equal(straight, resumed)
    names = [n for n, _ in _model().named_parameters()]
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in keys if k.startswith("feedback.")} == set(names)
