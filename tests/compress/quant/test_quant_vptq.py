"""VPTQ-style vector quantization: exact recovery of a weight made of K distinct vectors, 2 bits per weight
beats 2-bit RTN, Hessian weighting and error compensation lower the layer loss, residual codebooks help,
k-means is monotone and weighted, and bad arguments are rejected by name."""

import pytest
import torch

from trainlab.compress.quant.grids import quantize_rtn, sqnr_db
from trainlab.compress.quant.nupes import reconstruction_loss
from trainlab.compress.quant.vptq import VQWeight, kmeans, quantize_vptq, settings_for_bits

torch.set_num_threads(1)


def _gauss(rows=96, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hessian(cols, seed=1, mix=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(cols, dtype=torch.float64) + mix * torch.randn(cols, cols, generator=g, dtype=torch.float64))
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("use_hessian", [False, True])
def test_k_distinct_vectors_are_recovered_exactly(use_hessian):
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(16, 4, generator=g, dtype=torch.float64).half().double()  # float16-exact codebook
    which = torch.randint(0, 16, (40, 12), generator=g)
    which[0, :12], which[1, :4] = torch.arange(12), torch.arange(12, 16)  # every vector used
    w = vectors[which].reshape(40, 48)
    h = _hessian(48) if use_hessian else None
    q = quantize_vptq(w, h, vector_len=4, num_centroids=16)
    assert isinstance(q, VQWeight) and q.shape == (40, 48) and q.bits_per_weight == 1.0
    assert torch.equal(q.dequantize(torch.float64), w)


@pytest.mark.parametrize("maker", ["gauss", "heavy"])
def test_two_bits_per_weight_beats_two_bit_rtn(maker):
    w = _gauss(128, 256, seed=3)
    if maker == "heavy":
        w = torch.sign(w) * w.abs() ** 1.5
    k, k_res = settings_for_bits(2.0, 4)
    q = quantize_vptq(w, vector_len=4, num_centroids=k, num_res_centroids=k_res, kiter=30)
    assert q.bits_per_weight == 2.0 and q.res_codebook is None
    vq = sqnr_db(w, q.dequantize(torch.float64))
    rtn = sqnr_db(w, quantize_rtn(w, 2).dequantize(torch.float64))
    rtn_g = sqnr_db(w, quantize_rtn(w, 2, group_size=32).dequantize(torch.float64))
    assert vq > max(rtn, rtn_g) + 3


def test_hessian_weighting_lowers_layer_loss():
    # diagonal Hessian with a wide spread: no compensation, only the weighting differs
    cols = 64
    diag = torch.exp(torch.linspace(-3, 3, cols, dtype=torch.float64))[
        torch.randperm(cols, generator=torch.Generator().manual_seed(4))
    ]
    h = torch.diag(diag)
    w = _gauss(64, cols, seed=5)
    weighted = quantize_vptq(w, h, num_centroids=64, kiter=30)
    plain = quantize_vptq(w, h, num_centroids=64, kiter=30, weighted=False)
    lw = reconstruction_loss(w, weighted.dequantize(torch.float64), h)
    lp = reconstruction_loss(w, plain.dequantize(torch.float64), h)
    assert lw < 0.7 * lp


def test_error_compensation_lowers_layer_loss():
    w = _gauss(64, 96, seed=6)
    h = _hessian(96, mix=1.0)
    comp = quantize_vptq(w, h, num_centroids=64, kiter=30, block_size=32)
    none = quantize_vptq(w, num_centroids=64, kiter=30)
    lc = reconstruction_loss(w, comp.dequantize(torch.float64), h)
    ln = reconstruction_loss(w, none.dequantize(torch.float64), h)
    assert lc < 0.8 * ln


@pytest.mark.parametrize("use_hessian", [False, True])
def test_residual_codebook_helps(use_hessian):
    w = _gauss(64, 64, seed=7)
    h = _hessian(64) if use_hessian else None
    base = quantize_vptq(w, h, num_centroids=32, kiter=30)
    res = quantize_vptq(w, h, num_centroids=32, num_res_centroids=16, kiter=30)
    assert res.index_bits == 9 and res.bits_per_weight == 9 / 4
    lb = reconstruction_loss(w, base.dequantize(torch.float64), h)
    lr = reconstruction_loss(w, res.dequantize(torch.float64), h)
    assert lr < 0.8 * lb


def test_kmeans_monotone_and_weighted_means():
    x = _gauss(500, 3, seed=8)
    c, assign, history = kmeans(x, 8, iters=50, tol=0)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:], strict=False))
    assert torch.equal(assign, torch.cdist(x, c).argmin(1))
    # one cluster: the centroid is the weighted mean, per coordinate
    wt = torch.rand(500, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    c1, _, _ = kmeans(x, 1, weights=wt)
    assert torch.allclose(c1[0], (wt * x).sum(0) / wt.sum(0))


def test_settings_for_bits():
    assert settings_for_bits(2) == (256, 0)
    assert settings_for_bits(3) == (256, 16)
    assert settings_for_bits(4, 2) == (256, 0)
    assert settings_for_bits(1, 8) == (256, 0)
    with pytest.raises(ValueError, match="bits_per_weight"):
        settings_for_bits(5, 4)
    with pytest.raises(ValueError, match="bits_per_weight"):
        settings_for_bits(0)


def test_bad_arguments():
    w = _gauss(16, 32)
    with pytest.raises(ValueError, match="vector_len"):
        quantize_vptq(w, vector_len=3)
    with pytest.raises(ValueError, match="num_centroids"):
        quantize_vptq(w, num_centroids=512)
    with pytest.raises(ValueError, match="num_centroids"):
        quantize_vptq(w, num_centroids=1)
    with pytest.raises(ValueError, match="num_centroids"):
        quantize_vptq(w[:4, :8], num_centroids=16)
    with pytest.raises(ValueError, match="num_res_centroids"):
        quantize_vptq(w, num_centroids=16, num_res_centroids=1)
    with pytest.raises(ValueError, match="hessian"):
        quantize_vptq(w, torch.eye(16), num_centroids=16)
    with pytest.raises(ValueError, match="weighted"):
        quantize_vptq(w, num_centroids=16, weighted="yes")
    with pytest.raises(ValueError, match="codebook_dtype"):
        quantize_vptq(w, num_centroids=16, codebook_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weights"):
        kmeans(w.reshape(-1, 4), 4, weights=-torch.ones(4))
