"""Export: bitmask / CSR / N:M encodings through safetensors round-trip bit for bit, the files are smaller,
hold no mask clutter, and the loader re-arms masks so retraining keeps the zeros."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from trainlab.compress.bits import pack_bits, unpack_bits
from trainlab.compress.export import load_compressed, save_compressed, save_dense
from trainlab.compress.masks import get_mask, mask_pattern, masked_layers
from trainlab.compress.plan import Plan
from trainlab.compress.storage import META_KEY


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 64),
        nn.ReLU(),
        nn.Linear(64, 10, bias=False),
    )


def _input() -> torch.Tensor:
    return torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def _stored(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[META_KEY])["packed"]  # noqa: SIM118


@pytest.mark.parametrize(
    ("plan", "fmt", "expected"),
    [
        ([(".*", "magnitude", 0.7)], "auto", "bitmask"),
        ([(".*", "magnitude", 0.7)], "bitmask", "bitmask"),
        ([(".*", "magnitude", 0.7)], "csr", "csr"),
        ([("6", "magnitude", 0.98)], "auto", "csr"),  # CSR is smaller than the bitmask only this sparse
        ([("6", "magnitude", 0.9)], "auto", "bitmask"),
        ([("[26]", "nm", "2:4"), ("8", "nm", "1:8")], "auto", "nm"),
    ],
)
def test_round_trip_is_bit_exact_and_smaller(tmp_path, plan, fmt, expected):
    model = _cnn()
    model[3].running_mean.normal_()  # buffers travel too
    Plan(plan).apply(model)
    model.eval()
    dense_bytes = save_dense(model, tmp_path / "dense.safetensors")
    sparse_bytes = save_compressed(model, tmp_path / "sparse.safetensors", fmt=fmt)
    assert sparse_bytes < dense_bytes
    tensors, described = _stored(tmp_path / "sparse.safetensors")
    assert {d["kind"] for d in described.values()} == {expected}
    assert not [k for k in tensors if "orig" in k or "weight_mask" in k or "sparsity_mask" in k]
    assert not set(described) & set(tensors)  # masked weights are only stored encoded
    loaded = load_compressed(tmp_path / "sparse.safetensors", _cnn).eval()
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for name, layer in masked_layers(model).items():
        twin = dict(loaded.named_modules())[name]
        assert torch.equal(get_mask(layer), get_mask(twin)) and mask_pattern(layer) == mask_pattern(twin)
    x = _input()
    assert torch.equal(model(x), loaded(x))


def test_nm_stores_n_of_m_values_and_log2_m_bit_positions(tmp_path):
    model = _cnn()
    Plan([("[268]", "nm", "2:4")]).apply(model)
    save_compressed(model, tmp_path / "nm.safetensors")
    tensors, described = _stored(tmp_path / "nm.safetensors")
    for key in described:
        numel = dict(model.named_parameters())[key].numel()
        assert tensors[f"{key}::values"].numel() == numel // 2
        assert tensors[f"{key}::nm_index"].numel() == numel // 2 * 2 // 8  # 2 bits per kept value


def test_loaded_model_keeps_zeros_when_retrained(tmp_path):
    model = _cnn()
    Plan([(".*", "magnitude", 0.8)]).apply(model)
    save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(tmp_path / "m.safetensors", _cnn)
    zeros = {n: m.weight == 0 for n, m in masked_layers(loaded).items()}
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        loaded(_input()).pow(2).mean().backward()
        opt.step()
    assert all(bool((m.weight[zeros[n]] == 0).all()) for n, m in masked_layers(loaded).items())


def test_user_metadata_is_kept_and_bad_format_is_an_error(tmp_path):
    model = _cnn()
    Plan([("8", "magnitude", 0.5)]).apply(model)
    save_compressed(model, tmp_path / "m.safetensors", metadata={"plan": "x"})
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata()["plan"] == "x"
    with pytest.raises(ValueError, match="fmt must be one of auto, bitmask, csr"):
        save_compressed(model, tmp_path / "m.safetensors", fmt="zip")
