"""Packed quantized formats: codes round-trip bit for bit at every width and length, 3-bit codes straddle bytes,
files are the formats' nbytes plus a small header, and the loaded weights dequantize identically."""

import functools
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from trainlab.compress.bits import pack_codes, pack_trits, unpack_codes, unpack_trits
from trainlab.compress.quant.gptq import collect_hessians, quantize_gptq
from trainlab.compress.quant.grids import QuantizedWeight, UniformGrid, quantize_rtn
from trainlab.compress.quant.ptqtp import TritPlanes, quantize_ptqtp
from trainlab.compress.storage import dequantized, load, save


def save_quantized(path, weights, tensors=None, metadata=None):
    return save(path, tensors or {}, weights, metadata)


def load_quantized(path):
    state, packed = load(path)
    return packed, state


def dequantized_state(path, dtype=torch.float32):
    return dequantized(*load(path), dtype)


def nominal_bytes(q):
    return q.nbytes()


def header_bytes(path) -> int:
    """The safetensors header: an 8-byte length, then that many bytes of JSON (names, dtypes, metadata)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def assert_packed_size(path, size, weights, extra=0):
    """The file is exactly the formats' nbytes (plus ``extra`` plain bytes) and its header, ~130 bytes a layer."""
    assert size == path.stat().st_size == sum(q.nbytes() for q in weights.values()) + extra + header_bytes(path)
    assert header_bytes(path) < 150 * sum(len(q.to_tensors("x::")) for q in weights.values()) + 100


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 13, 1001])
def test_pack_round_trip(bits, count):
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_codes(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    out = unpack_codes(packed, bits, count)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), codes)


def test_three_bit_codes_cross_byte_boundaries():
    # codes 0..7: bits, least significant first, are 000 100 010 110 001 101 011 111 -> 3 dense bytes
    packed = pack_codes(torch.arange(8), 3)
    assert packed.tolist() == [0b00010001, 0b01100011, 0b01011111]
    assert torch.equal(unpack_codes(packed, 3, 8), torch.arange(8, dtype=torch.uint8))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([-1, 0]), 2)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0, 1]), 9)
    with pytest.raises(ValueError, match="packed"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)
    with pytest.raises(ValueError, match="count"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, -1)


def _weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g, dtype=torch.float64)
    return {
        "a.weight": quantize_rtn(w, 2, group_size=64),
        "b.weight": quantize_rtn(w[:33, :101], 3, symmetric=False, group_size=32),  # odd sizes, short last group
        "c.weight": quantize_rtn(w, 4, symmetric=False),
        "d.weight": quantize_rtn(w[:, :75], 8),
    }


@pytest.mark.parametrize("name", ["a.weight", "b.weight", "c.weight", "d.weight"])
def test_file_size_is_nominal_plus_header(tmp_path, name):
    q = _weights()[name]
    size = save_quantized(tmp_path / "q.safetensors", {name: q})
    codes_bytes = math.ceil(q.codes.numel() * q.bits / 8)
    assert nominal_bytes(q) >= codes_bytes + 2 * q.scale.numel()
    assert_packed_size(tmp_path / "q.safetensors", size, {name: q})


def test_save_load_round_trip_is_identical(tmp_path):
    weights = _weights()
    bias = torch.randn(96)
    path = tmp_path / "q.safetensors"
    save_quantized(path, weights, {"a.bias": bias}, metadata={"note": "test"})
    loaded, plain = load_quantized(path)
    assert set(loaded) == set(weights) and torch.equal(plain["a.bias"], bias)
    for name, q in weights.items():
        back = loaded[name]
        assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero)
        assert back.scale.dtype == torch.float16
        assert (back.bits, back.symmetric, back.group_size) == (q.bits, q.symmetric, q.group_size)
        assert torch.equal(back.dequantize(torch.float64), q.dequantize(torch.float64))
    state = dequantized_state(path)
    assert torch.equal(state["c.weight"], weights["c.weight"].dequantize(torch.float32))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["note"] == "test"
        assert "b.weight::zero" in f.keys() and "a.weight::zero" not in f.keys()  # noqa: SIM118


def test_gptq_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    inputs = [torch.randn(16, 24) for _ in range(4)]
    hessians = collect_hessians(model, inputs)
    grid = UniformGrid(3, group_size=8)
    weights = {f"{n}.weight": quantize_gptq(model[int(n)].weight, h, grid) for n, h in hessians.items()}
    plain = {k: v for k, v in model.state_dict().items() if k not in weights}
    save_quantized(tmp_path / "m.safetensors", weights, plain)
    fresh = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    fresh.load_state_dict(dequantized_state(tmp_path / "m.safetensors"))
    for name, q in weights.items():
        assert torch.equal(fresh.state_dict()[name], q.dequantize(torch.float32))
    assert torch.equal(fresh[0].bias, model[0].bias)


def test_save_rejects_unstorable_weights(tmp_path):
    w = torch.randn(4, 8, dtype=torch.float64)
    exact = quantize_rtn(w, 4, scale_dtype=None)
    with pytest.raises(ValueError, match="float16"):
        save_quantized(tmp_path / "x.safetensors", {"w": exact})
    q = quantize_rtn(w, 4)
    with pytest.raises(ValueError, match="must not contain"):
        save_quantized(tmp_path / "x.safetensors", {"w::x": q})
    with pytest.raises(ValueError, match="must not contain"):
        save_quantized(tmp_path / "x.safetensors", {"w": q}, {"w": w})
    bad_zero = QuantizedWeight(q.codes, q.scale, q.zero + 1, 4, True, None)
    with pytest.raises(ValueError, match=r"packed\['w'\] \(uniform\): .*zero points"):
        save_quantized(tmp_path / "x.safetensors", {"w": bad_zero})
    with pytest.raises(ValueError, match="registered packed formats"):
        save_quantized(tmp_path / "x.safetensors", {"w": w})


@pytest.mark.parametrize("count", [0, 1, 4, 5, 6, 1003])
def test_trit_round_trip(count):
    trits = torch.randint(-1, 2, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack_trits(trits.to(torch.int8))
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count / 5)
    out = unpack_trits(packed, count)
    assert out.dtype == torch.int8 and torch.equal(out.long(), trits)


def test_trit_layout_and_bad_input():
    # base 3, first trit least significant: digits (t + 1) = 2, 0, 1, 1, 2 -> 2 + 0 + 9 + 27 + 162 = 200
    assert pack_trits(torch.tensor([1, -1, 0, 0, 1])).tolist() == [200]
    assert pack_trits(torch.ones(5, dtype=torch.int64)).tolist() == [242]
    with pytest.raises(ValueError, match="trits"):
        pack_trits(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="trits"):
        pack_trits(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="packed"):
        unpack_trits(torch.tensor([243], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="packed"):
        unpack_trits(torch.zeros(2, dtype=torch.uint8), 5)


def test_trit_planes_round_trip_and_size(tmp_path):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    planes = quantize_ptqtp(w, group_size=64)
    mixed = {"p.weight": planes, "r.weight": quantize_rtn(w, 3)}
    size = save_quantized(tmp_path / "t.safetensors", mixed)
    assert nominal_bytes(planes) == 2 * math.ceil(96 * 256 / 5) + 2 * 2 * 96 * 4
    assert_packed_size(tmp_path / "t.safetensors", size, mixed)
    loaded, _ = load_quantized(tmp_path / "t.safetensors")
    back = loaded["p.weight"]
    assert isinstance(back, TritPlanes) and back.group_size == 64
    assert torch.equal(back.t1, planes.t1) and torch.equal(back.t2, planes.t2)
    assert torch.equal(back.dequantize(torch.float64), planes.dequantize(torch.float64))
    assert back.dequantize().dtype == torch.float32
    assert torch.equal(loaded["r.weight"].dequantize(torch.float64), mixed["r.weight"].dequantize(torch.float64))
    with pytest.raises(ValueError, match="alpha1"):
        save_quantized(tmp_path / "x.safetensors", {"p": quantize_ptqtp(w, scale_dtype=None)})


@functools.cache
def _new_kinds():
    from trainlab.compress.quant.gwq import quantize_gwq
    from trainlab.compress.quant.nupes import quantize_nupes
    from trainlab.compress.quant.vptq import quantize_vptq

    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 128, generator=g, dtype=torch.float64) ** 3
    grad = torch.randn(64, 128, generator=g, dtype=torch.float64)
    x = torch.randn(256, 128, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / 256
    return {
        "n.weight": quantize_nupes(w, 3),
        "m.weight": quantize_nupes(w[:33, :101], 2, symmetric=False, group_size=32, exponent=0.6),
        "v.weight": quantize_vptq(w, num_centroids=256, kiter=10),
        "r.weight": quantize_vptq(w[:, :96], vector_len=8, num_centroids=64, num_res_centroids=32, kiter=10),
        "g.weight": quantize_gwq(w, 3, grad),
        "h.weight": quantize_gwq(w[:30, :77], 4, grad[:30, :77], fraction=0.03, symmetric=False, group_size=16),
        "k.weight": quantize_gwq(w, 2, grad, hessian=h, group_size=32, block_size=64),  # GPTQ-compensated outliers
        "p.weight": quantize_nupes(w, 3, hessian=h, second_order=True, group_size=64),
        "q.weight": quantize_vptq(w, h, num_centroids=64, num_res_centroids=4, kiter=10),
    }


def test_new_kinds_nominal_bytes():
    q = _new_kinds()
    assert nominal_bytes(q["n.weight"]) == 64 * 128 * 3 // 8 + 2 * 64
    assert nominal_bytes(q["v.weight"]) == 64 * 128 // 4 + 2 * 256 * 4  # 8-bit indices of 4-vectors + codebook
    # 6-bit + 5-bit indices per 8-vector, two float16 codebooks
    assert nominal_bytes(q["r.weight"]) == math.ceil(64 * 12 * 6 / 8) + math.ceil(64 * 12 * 5 / 8) + 2 * 8 * (64 + 32)
    assert q["g.weight"].indices.numel() == math.ceil(0.01 * 64 * 128) == 82
    assert nominal_bytes(q["g.weight"]) == 64 * 128 * 3 // 8 + 2 * 64 + 6 * 82


@pytest.mark.parametrize(
    "name", ["n.weight", "m.weight", "v.weight", "r.weight", "g.weight", "h.weight", "k.weight", "p.weight", "q.weight"]
)
def test_new_kinds_round_trip_and_size(tmp_path, name):
    q = _new_kinds()[name]
    size = save_quantized(tmp_path / "q.safetensors", {name: q})
    assert_packed_size(tmp_path / "q.safetensors", size, {name: q})
    loaded, _ = load_quantized(tmp_path / "q.safetensors")
    back = loaded[name]
    assert type(back) is type(q)
    assert torch.equal(back.dequantize(torch.float64), q.dequantize(torch.float64))
    assert torch.equal(back.dequantize(torch.float32), q.dequantize(torch.float32))
    assert back.dequantize().dtype == torch.float32


def test_all_kinds_in_one_file(tmp_path):
    from trainlab.compress.quant.nupes import PowerQuantizedWeight

    weights = {**_new_kinds(), **_weights()}
    path = tmp_path / "all.safetensors"
    size = save_quantized(path, weights, {"bias": torch.ones(3)})
    assert_packed_size(path, size, weights, extra=3 * 4)  # + the float32 bias
    loaded, plain = load_quantized(path)
    assert isinstance(loaded["n.weight"], PowerQuantizedWeight) and loaded["m.weight"].exponent == 0.6
    assert not isinstance(loaded["a.weight"], PowerQuantizedWeight)
    state = dequantized_state(path, torch.float64)
    for name, q in weights.items():
        assert torch.equal(state[name], q.dequantize(torch.float64)), name
    assert torch.equal(plain["bias"], torch.ones(3))


def test_new_kinds_reject_unstorable(tmp_path):
    from trainlab.compress.quant.gwq import quantize_gwq
    from trainlab.compress.quant.vptq import quantize_vptq

    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="codebook"):
        save_quantized(tmp_path / "x.safetensors", {"w": quantize_vptq(w, num_centroids=16, codebook_dtype=None)})
    with pytest.raises(ValueError, match="values"):
        save_quantized(tmp_path / "x.safetensors", {"w": quantize_gwq(w + 1e-5, 3, w, value_dtype=None)})
