"""Compressors and error-feedback schemes against their equations, in float64."""

import math

import pytest
import torch

from trainlab.distributed import (
    CountSketch,
    ErrorFeedback,
    Identity,
    ScaledSign,
    SimulatedWorkers,
    TopK,
    create_compressor,
)

D = torch.float64


def _x(n=37, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_topk_keeps_the_largest_entries_and_counts_bytes_exactly():
    x = _x()
    c = TopK(ratio=0.1)
    payload = c.encode(x, 0)
    k = math.ceil(0.1 * 37)
    assert payload.dtype == torch.uint8 and payload.numel() == c.payload_bytes(37, D) == k * (8 + 4)
    y = c.decode(payload, 37, D, 0)
    keep = x.abs().argsort(descending=True)[:k]
    ref = torch.zeros_like(x)
    ref[keep] = x[keep]
    assert torch.equal(y, ref)
    # contractive with alpha = k/d
    assert (y - x).square().sum() <= (1 - k / 37) * x.square().sum()


def test_scaled_sign_is_l1_scale_times_sign_with_bit_packing():
    x = _x(21)
    x[3] = 0.0
    c = ScaledSign()
    payload = c.encode(x, 0)
    assert payload.numel() == c.payload_bytes(21, D) == 3 + 8
    sign = torch.where(x < 0, -1.0, 1.0).to(D)
    assert torch.equal(c.decode(payload, 21, D, 0), x.abs().sum() / 21 * sign)


def test_count_sketch_is_linear_unbiased_and_one_eighth_of_the_bytes():
    x = _x(64)
    c = CountSketch(ratio=0.125)
    assert c.encode(x, 5).numel() == 8 and c.payload_bytes(64, D) == 64 * 8 // 8
    # linear: the sum of two sketches decodes to the sum of the two desketched vectors
    y = _x(64, 1)
    both = c.decode(c.encode(x, 5) + c.encode(y, 5), 64, D, 5)
    assert torch.allclose(both, c.compress(x, 5) + c.compress(y, 5), atol=1e-12, rtol=0)
    # R^T R x, with R one +-1 per column at bucket h(j): explicit matrix from the same seed
    h, s = c._hash(64, D, 5, x.device)
    r = torch.zeros(8, 64, dtype=D)
    r[h, torch.arange(64)] = s
    assert torch.allclose(c.compress(x, 5), r.T @ (r @ x), atol=1e-12, rtol=0)
    # E[R^T R x] = x over fresh seeds: each entry's variance is about ||x||^2 / s, so over N draws the mean's
    # relative error is about sqrt(d / (s N)) = 0.063; without the signs the bias alone would be about 1.
    mean = torch.stack([c.compress(x, seed) for seed in range(2000)]).mean(0)
    assert (mean - x).norm() / x.norm() < 3 * math.sqrt(64 / (8 * 2000))
    assert not torch.equal(c.compress(x, 1), c.compress(x, 2))


def _reference(kind, grads_per_round, comp, n, weights=None):
    """The schemes' equations written out per worker (no payloads)."""
    w = torch.full((n,), 1.0 / n, dtype=D) if weights is None else weights
    e = [torch.zeros(5, dtype=D) for _ in range(n)]
    gi = [None] * n
    g = None
    out = []
    for grads in grads_per_round:
        if kind == "ef":
            ms = []
            for i in range(n):
                e[i] = e[i] + grads[i]
                ms.append(comp(e[i]))
                e[i] = e[i] - ms[-1]
            out.append(sum(ms) / n)
        else:  # ef21 / ef21-w, full first round
            if g is None:
                gi = [grads[i] / (n * w[i]) for i in range(n)]
                g = sum(w[i] * gi[i] for i in range(n))
            else:
                cs = [comp(grads[i] / (n * w[i]) - gi[i]) for i in range(n)]
                gi = [gi[i] + cs[i] for i in range(n)]
                g = g + sum(w[i] * cs[i] for i in range(n))
            out.append(g)
    return out


@pytest.mark.parametrize("kind", ["ef", "ef21", "ef21-w"])
def test_feedback_schemes_follow_their_equations(kind):
    n = 3
    comp = TopK(ratio=0.4)  # 2 of 5
    smooth = [1.0, 4.0, 10.0] if kind == "ef21-w" else None
    weights = None if smooth is None else torch.tensor(smooth, dtype=D) / sum(smooth)
    rounds = [[_x(5, 10 * t + i) for i in range(n)] for t in range(4)]
    sim = SimulatedWorkers(n, comp, kind, smoothness=smooth)
    got = [sim.aggregate(r) for r in rounds]
    ref = _reference(kind, rounds, lambda v: comp.compress(v), n, weights)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # weighted EF21 estimates f = (1/n) sum f_i: with the identity its aggregate is the plain mean
    if kind == "ef21-w":
        dense = SimulatedWorkers(n, Identity(), kind, smoothness=smooth)
        for r in rounds:
            assert torch.allclose(dense.aggregate(r), sum(r) / n, atol=1e-12, rtol=0)


def test_identity_feedback_is_bitwise_the_plain_mean_and_bytes_are_counted():
    rounds = [[_x(9, 10 * t + i).float() for i in range(2)] for t in range(3)]
    for kind in ("none", "ef", "ef21"):
        sim = SimulatedWorkers(2, Identity(), kind)
        for r in rounds:
            assert torch.equal(sim.aggregate(r), r[0] * 0.5 + r[1] * 0.5)
        assert sim.bytes_sent == sim.dense_bytes == 3 * 9 * 4
    topk = SimulatedWorkers(2, TopK(ratio=0.2), "ef21")
    for r in rounds:
        topk.aggregate(r)
    assert topk.bytes_sent == 9 * 4 + 2 * 2 * (4 + 4)  # dense first round, then 2 values + 2 indices


def test_state_dict_round_trips_and_is_keyed_by_name():
    sim = SimulatedWorkers(2, TopK(ratio=0.4), "ef21")
    grads = [{"a": _x(5, i), "b": _x(3, 7 + i)} for i in range(2)]
    sim.aggregate(grads)
    state = sim.workers[0].state_dict()
    assert set(state) == {"a.local", "a.aggregate", "b.local", "b.aggregate"}
    fresh = ErrorFeedback("ef21", TopK(ratio=0.4), rank=0, world_size=2)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_bad_arguments_name_what_is_allowed():
    with pytest.raises(ValueError, match="ratio"):
        TopK(ratio=0.0)
    with pytest.raises(ValueError, match="unknown compressor"):
        create_compressor("randk")
    with pytest.raises(ValueError, match="ratio must be"):
        create_compressor("topk", ratio=2.0)
    with pytest.raises(ValueError, match="smoothness"):
        ErrorFeedback("ef21-w", Identity(), rank=0, world_size=2)
    with pytest.raises(ValueError, match="kind"):
        ErrorFeedback("ef22", Identity(), rank=0, world_size=2)
    with pytest.raises(TypeError, match="flat"):
        TopK().encode(torch.zeros(2, 2), 0)
