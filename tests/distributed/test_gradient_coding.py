"""Gradient coding and M-SGC simulations: loads, the straggler model, decodability, exact decoding."""

import itertools

import numpy as np
import pytest
import torch

from trainlab.distributed.gradient_coding import (
    _msgc_decodable,
    bursty_delays,
    fractional_repetition_decode,
    gc_load,
    msgc_load,
    simulate_gc,
    simulate_msgc,
    simulate_srsgc,
)


def test_loads_follow_the_papers_formulas():
    assert gc_load(16, 3) == 4 / 16
    assert msgc_load(16, 2, 6, 3) == pytest.approx(4 * 7 / (16 * (2 + 5 * 4)))


def test_no_stragglers_every_round_waits_for_the_fastest_times_one_plus_mu():
    delays = np.ones((8, 20))
    delays[:, 5] = 2.0
    gc, m = simulate_gc(delays, 1), simulate_msgc(delays, 2, 4, 1)
    assert gc.fallback_rounds == m.fallback_rounds == 0
    assert np.allclose(gc.durations, gc.load * delays.min(0) * 1.1)
    assert np.allclose(m.durations, m.load * delays.min(0) * 1.1)
    assert m.jobs == 20 - (4 - 2 + 2)


def test_straggler_model_violations_fall_back_to_waiting_for_everyone():
    n, rounds = 8, 30
    delays = np.ones((n, rounds))
    delays[0, 3:6] = 5.0  # a burst of 3 rounds > B=2
    delays[1:4, 10] = 5.0  # 3 distinct stragglers > lambda=2 in one window
    m = simulate_msgc(delays, 2, 4, 2)
    assert m.fallback_rounds == 2  # round 5 (burst too long) and round 10
    assert m.durations[10] == pytest.approx(m.load * 5.0)
    gc = simulate_gc(delays, 2)
    assert gc.fallback_rounds == 1 and gc.durations[10] == pytest.approx(gc.load * 5.0)


def test_msgc_decoding_rule_needs_every_d1_and_n_minus_lambda_per_d2_group():
    n, d1, b, lam = 4, 2, 2, 1
    ok = np.array([[0, 0, 1, 2]] * n)
    assert _msgc_decodable(ok, d1, b, n, lam)
    missing_d1 = ok.copy()
    missing_d1[0] = [0, -1, 0, 2]  # redid its D1 in group 1's slot: still all D1, group 1 has n-1 results
    assert _msgc_decodable(missing_d1, d1, b, n, lam)
    missing_d1[1] = [-1, -1, 0, 0]  # only 2 D1 done but group 1 and 2 lose another result each
    assert not _msgc_decodable(missing_d1, d1, b, n, lam)
    never = ok.copy()
    never[2] = [0, -1, -1, -1]
    assert not _msgc_decodable(never, d1, b, n, lam)


def test_bursty_traces_respect_the_model_and_every_job_decodes():
    delays = bursty_delays(16, 300, b=2, w=6, lam=3, seed=1)
    m = simulate_msgc(delays, 2, 6, 3)
    assert m.decodable and m.jobs == 300 - 6
    assert m.fallback_rounds <= 10  # only lognormal noise beyond 10% can break the model


def test_fractional_repetition_decodes_the_exact_gradient_sum():
    n, s, d = 8, 1, 5
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(4, 10, d, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    part = torch.einsum("pmd,pm->pd", a, torch.einsum("pmd,d->pm", a, x) - y)  # each partition's gradient
    partials = part.repeat_interleave(s + 1, dim=0)  # group k's s+1 workers all compute partition k
    truth = torch.einsum("md,m->d", a.reshape(-1, d), a.reshape(-1, d) @ x - y.reshape(-1))
    for who in itertools.chain([()], itertools.combinations(range(n), 1)):
        straggler = torch.zeros(n, dtype=torch.bool)
        straggler[list(who)] = True
        assert torch.allclose(fractional_repetition_decode(partials, straggler, s), truth, atol=1e-10, rtol=0)
    both = torch.zeros(n, dtype=torch.bool)
    both[[2, 3]] = True  # a whole group
    with pytest.raises(RuntimeError, match="group"):
        fractional_repetition_decode(partials, both, s)
    with pytest.raises(ValueError, match="w > b"):
        simulate_msgc(np.ones((4, 10)), 3, 3, 1)


def test_srsgc_tolerance_and_load_follow_the_paper():
    from trainlab.distributed.gradient_coding import srsgc_s

    assert srsgc_s(2, 7, 3) == 1 and srsgc_s(2, 5, 4) == 2 and srsgc_s(3, 7, 5) == 2  # ceil(B lam / (W-1+B))
    delays = np.ones((8, 10))
    r = simulate_srsgc(delays, 2, 7, 3)
    assert r.load == gc_load(8, 1) and r.jobs == 8 and r.received.all() and r.fallback_rounds == 0
    with pytest.raises(ValueError, match="B \\| \\(W - 1\\)"):
        simulate_srsgc(delays, 2, 6, 3)


def test_srsgc_repeats_missing_tasks_b_rounds_later_stragglers_first():
    n, b, w, lam = 8, 1, 4, 3  # s = ceil(3/4) = 1
    delays = np.ones((n, 6))
    delays[:3, 0] = 5.0  # workers 0-2 straggle in round 0
    r = simulate_srsgc(delays, b, w, lam)
    # job 0: 5 results in round 0, workers 0 and 1 redo it in round 1 -> 7 = n - s; worker 2's task stays missing
    assert r.received[0].tolist() == [True, True, False, True, True, True, True, True]
    # job 1 misses workers 0 and 1 (busy redoing job 0); worker 0 redoes job 1 in round 2
    assert r.received[1].tolist() == [True, False, True, True, True, True, True, True]
    assert r.received[2].tolist() == [False, True, True, True, True, True, True, True]
    assert r.received[3:].all()
    assert np.allclose(r.durations, r.load * 1.1) and r.fallback_rounds == 0
    gc = simulate_gc(delays, 1)  # plain GC at the same load cannot decode round 0: it waits for the stragglers
    assert gc.fallback_rounds == 1 and gc.durations[0] == pytest.approx(gc.load * 5.0)


@pytest.mark.parametrize(("b", "w", "lam"), [(2, 7, 3), (1, 4, 3), (2, 5, 4), (3, 7, 5)])
def test_srsgc_decodes_every_job_of_worst_case_and_random_bursty_traces_exactly(b, w, lam):
    from trainlab.distributed.gradient_coding import srsgc_s, worst_case_bursts

    n, s = 12, srsgc_s(b, w, lam)
    traces = [worst_case_bursts(n, 60, b=b, w=w, lam=lam)] + [
        bursty_delays(n, 120, b=b, w=w, lam=lam, seed=seed) for seed in range(3)
    ]
    g = torch.Generator().manual_seed(0)
    partials = torch.randn(n // (s + 1), 5, generator=g, dtype=torch.float64).repeat_interleave(s + 1, dim=0)
    truth = partials[:: s + 1].sum(0)
    for delays in traces:
        r = simulate_srsgc(delays, b, w, lam)  # raises if a job misses its deadline
        for got in r.received:
            assert torch.equal(fractional_repetition_decode(partials, torch.from_numpy(~got), s), truth)
    worst = simulate_srsgc(traces[0], b, w, lam)
    assert worst.fallback_rounds == 0  # the worst-case pattern follows the model
    assert simulate_gc(traces[0], s).fallback_rounds > 0  # GC at SR-SGC's load waits for the bursts
    assert worst.load < gc_load(n, lam)
