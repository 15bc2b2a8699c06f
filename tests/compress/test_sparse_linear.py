"""SparseLinear: CSR only past the measured crossover (sparsity and size), outputs equal to the dense layer."""

import pytest
import torch
from torch import nn

from trainlab.compress import compress
from trainlab.compress.sparse_linear import SparseLinear, sparse_runtime_model


def pruned(shape: tuple[int, int], sparsity: float) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(shape)
    w.view(-1)[torch.randperm(w.numel())[: round(sparsity * w.numel())]] = 0
    return w


@pytest.mark.parametrize(
    ("shape", "sparsity", "kernel"),
    [((384, 384), 0.95, "csr"), ((384, 384), 0.5, "dense"), ((128, 128), 0.95, "dense"), ((384, 128), 0.9, "csr")],
)
def test_kernel_choice_and_outputs(shape, sparsity, kernel):
    w, b = pruned(shape, sparsity), torch.randn(shape[0])
    layer = SparseLinear(w, b)
    assert layer.kernel == kernel, layer.reason
    x = torch.randn(2, 3, shape[1])
    ref = (x.double() @ w.double().T + b.double()).float()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert layer(x[0, 0]).shape == (shape[0],)


def test_thresholds_are_checked_and_named():
    w = pruned((384, 384), 0.95)
    assert SparseLinear(w, min_sparsity=0.99).reason.startswith("sparsity 0.950 < 0.99")
    assert SparseLinear(pruned((128, 128), 0.95), min_weights=0).kernel == "csr"
    for bad in ({"min_sparsity": 1.5}, {"min_weights": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SparseLinear(w, **bad)


def test_sparse_runtime_model_swaps_pruned_layers_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 16))
    result = compress(model, [("0", "magnitude", 0.95)])
    fast = sparse_runtime_model(result.model)
    assert isinstance(result.model[0], nn.Linear) and isinstance(fast[2], nn.Linear)
    assert fast[0].kernel == "csr"
    x = torch.randn(4, 384)
    torch.testing.assert_close(fast(x), result.model(x), rtol=1e-5, atol=1e-5)
