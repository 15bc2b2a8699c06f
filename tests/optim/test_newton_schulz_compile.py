"""Newton-Schulz: compiled (torch.compile, one compiled function per shape and dtype) equals eager bitwise in float32
and bfloat16; a failed compile falls back to eager with the reason; bfloat16 iterations stay within bfloat16's
rounding of the float64 iteration; create("muon", ns_dtype=..., ns_compile=True) reaches both."""

import pytest
import torch
from torch import nn

from trainlab.optim import create
from trainlab.optim.transforms import orthogonal
from trainlab.optim.transforms.orthogonal import newton_schulz

SHAPE = (2, 32, 64)  # one compiled function (batch 2, wide 32x64) serves the function and the optimizer tests


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("shape", [(64, 32), (128, 128), (3, 32, 256)])
def test_bfloat16_iteration_is_within_bfloat16_rounding_of_float64(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    ref = newton_schulz(g.double())
    # 5 iterations x 3 products, each rounded to bfloat16 (unit roundoff 2^-9): at most ~15 u to first order
    assert 1e-4 < _relative(newton_schulz(g, dtype=torch.bfloat16), ref) < 16 * 2**-9
    assert newton_schulz(g, dtype=torch.bfloat16).dtype == torch.float32  # the input's dtype comes back
    assert _relative(newton_schulz(g), ref) < 1e-5  # float32 (the CPU default) is 4 orders closer


@pytest.mark.slow  # one inductor compile (seconds; about 30 s cold on a loaded 2-core machine)
def test_compiled_iteration_equals_eager_bitwise_and_muon_reaches_it():
    torch.manual_seed(0)
    g = torch.randn(SHAPE)
    for dtype in (None, torch.bfloat16):
        assert torch.equal(newton_schulz(g, dtype=dtype, compile=True), newton_schulz(g, dtype=dtype))
    assert torch.equal(newton_schulz(g.mT, compile=True), newton_schulz(g.mT))  # tall: the same wide iteration
    key = (torch.float32, "cpu", 5, False)
    assert key in orthogonal._COMPILED and key not in orthogonal.NS_COMPILE_FALLBACKS
    for shape in [(3, 48, 40), (5, 8, 8), (2, 1, 7)]:  # other shapes: the same compiled graph (dynamic shapes)
        h = torch.randn(shape)
        assert torch.equal(newton_schulz(h, compile=True), newton_schulz(h))
    assert not orthogonal.NS_COMPILE_FALLBACKS

    def run(**kw):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False))
        opt = create("muon", model.named_parameters(), lr=0.1, **kw)
        for step in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for dtype in (None, torch.bfloat16):
        for a, b in zip(run(ns_dtype=dtype, ns_compile=True), run(ns_dtype=dtype), strict=True):
            assert torch.equal(a, b)


def test_a_failed_compile_runs_eagerly_and_says_why(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C compiler found\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(orthogonal, "_COMPILED", {})
    monkeypatch.setattr(orthogonal, "NS_COMPILE_FALLBACKS", {})
    g = torch.randn(3, 24, 16)
    with pytest.warns(RuntimeWarning, match="on cpu runs eagerly: torch.compile failed \\(RuntimeError: no C compiler"):
        out = newton_schulz(g, compile=True)
    assert torch.equal(out, newton_schulz(g))
    assert orthogonal.NS_COMPILE_FALLBACKS == {(torch.float32, "cpu", 5, False): "RuntimeError: no C compiler found"}
    assert torch.equal(newton_schulz(g, compile=True), out)  # known to fail: eager again, no second warning
    with pytest.raises(ValueError, match="ns_compile"):
        create("muon", [torch.zeros(4, 4, requires_grad=True)], ns_compile="yes")
