"""One save/load for packed models: every registered format round-trips bit for bit through the file, tied
weights are stored once and tied again on load (dense, pruned and quantized exports), writes are atomic, and
bad input names what was wrong."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trainlab.compress.export import load_compressed, save_compressed, save_dense
from trainlab.compress.formats import FORMATS, format_of, register_format
from trainlab.compress.masks import get_mask
from trainlab.compress.plan import Plan
from trainlab.compress.quant.apply import load_quantized_model, quantize_model, save_quantized_model
from trainlab.compress.quant.grids import quantize_rtn
from trainlab.compress.quant.gwq import quantize_gwq
from trainlab.compress.quant.mixed import baq_quantize
from trainlab.compress.quant.nupes import quantize_nupes
from trainlab.compress.quant.ptqtp import quantize_ptqtp
from trainlab.compress.quant.vptq import quantize_vptq
from trainlab.compress.sparse_formats import MaskedWeight, encode_sparse
from trainlab.compress.storage import META_KEY, dequantized, load, read_metadata, retie, save, shared_aliases


def header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _one_of_each_kind() -> dict:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g)
    x = torch.randn(64, 32, generator=g)
    h = 2 * x.T @ x / 64
    mask = torch.rand(24, 32, generator=g) > 0.6
    nm_mask = torch.zeros(24, 8, 4, dtype=torch.bool)
    nm_mask[..., :2] = True
    return {
        "uniform": quantize_rtn(w, 3, symmetric=False, group_size=16),
        "power": quantize_nupes(w, 4, exponent=0.75),
        "trits": quantize_ptqtp(w, group_size=16),
        "vq": quantize_vptq(w, num_centroids=16, num_res_centroids=4, kiter=5),
        "outliers": quantize_gwq(w, 3, torch.randn(24, 32, generator=g)),
        "column-bits": baq_quantize(w, h, 3).codes,
        "bitmask": encode_sparse(w * mask, mask, "bitmask"),
        "csr": encode_sparse(w * mask, mask, "csr"),
        "nm": encode_sparse(w * nm_mask.reshape(24, 32), nm_mask.reshape(24, 32), "auto", (2, 4)),
        "masked": MaskedWeight(quantize_rtn(w, 4), mask, None),
    }


def test_every_registered_format_round_trips_bit_for_bit(tmp_path):
    objs = _one_of_each_kind()
    assert set(objs) == set(FORMATS)  # a new format needs an entry here
    assert all(type(o).kind == k for k, o in objs.items())
    path = tmp_path / "all.safetensors"
    size = save(path, {"bias": torch.arange(3.0)}, {f"{k}.weight": o for k, o in objs.items()}, {"note": "x"})
    assert size == sum(o.nbytes() for o in objs.values()) + 12 + header_bytes(path)
    state, packed = load(path)
    assert torch.equal(state["bias"], torch.arange(3.0)) and read_metadata(path) == {"note": "x"}
    for kind, obj in objs.items():
        back = packed[f"{kind}.weight"]
        assert type(back) is type(obj) and back.nbytes() == obj.nbytes()
        assert torch.equal(back.dequantize(torch.float64), obj.dequantize(torch.float64)), kind
        assert torch.equal(back.dequantize(torch.float32), obj.dequantize(torch.float32)), kind
        assert back.metadata() == obj.metadata()


def test_a_fresh_process_finds_every_format_through_the_registry(tmp_path):
    """Nothing imports the quantizer modules: the compression registry does, before load resolves the kinds."""
    objs = _one_of_each_kind()
    path = tmp_path / "all.safetensors"
    save(path, {}, {f"{k}.weight": o for k, o in objs.items()})
    code = (
        "import sys; from trainlab.compress.storage import load; "
        "print(' '.join(sorted(p.kind for p in load(sys.argv[1])[1].values())))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == sorted(objs)


class TiedLM(nn.Module):
    """Embedding -> Linear -> output layer whose weight is the embedding's (as in Hugging Face models)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.hidden = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.hidden(self.embed(ids))))


IDS = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(1))


def _plain_bytes(model: nn.Module, skip=()) -> int:
    params = {id(p): p for n, p in model.named_parameters() if n not in skip}
    return sum(p.numel() * p.element_size() for p in params.values())


@pytest.mark.parametrize("tie_on_load", [True, False])
def test_dense_export_stores_a_tied_weight_once_and_ties_it_again(tmp_path, tie_on_load):
    model = TiedLM()
    path = tmp_path / "dense.safetensors"
    size = save_dense(model, path)
    assert size == _plain_bytes(model) + header_bytes(path)  # the 64x32 embedding counted once
    with safe_open(str(path), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
        assert json.loads(f.metadata()[META_KEY])["aliases"] == {"lm_head.weight": "embed.weight"}
    state, packed = load(path)
    assert not packed and state["lm_head.weight"] is state["embed.weight"]
    fresh = TiedLM(tie=tie_on_load)
    fresh.load_state_dict(state)
    retie(fresh, {"lm_head.weight": "embed.weight"})
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh(IDS), model(IDS))


@pytest.mark.parametrize("tie_on_load", [True, False])
def test_quantized_export_of_a_tied_model_stores_the_shared_weight_once(tmp_path, tie_on_load):
    model = TiedLM()
    qm = quantize_model(model, "rtn", 4, group_size=16, runtime="float")
    assert qm.model.embed.weight is qm.model.lm_head.weight  # the tie survives, now with quantized values
    assert not torch.equal(model.embed.weight, qm.model.embed.weight)  # the caller's model is untouched
    path = tmp_path / "q.safetensors"
    size = save_quantized_model(qm, path)
    packed_bytes = sum(q.nbytes() for q in qm.weights.values())
    dense_rest = _plain_bytes(qm.model, skip={"embed.weight", "hidden.weight"})  # hidden.bias only
    assert size == packed_bytes + dense_rest + header_bytes(path)
    reloaded = load_quantized_model(path, lambda: TiedLM(tie=tie_on_load), runtime="float")
    assert reloaded.lm_head.weight is reloaded.embed.weight
    assert torch.equal(reloaded(IDS), qm.model(IDS))


def test_pruned_export_of_a_tied_model_keeps_the_tie(tmp_path):
    model = TiedLM()
    Plan([("lm_head", "magnitude", 0.5)]).apply(model)
    path = tmp_path / "sparse.safetensors"
    save_compressed(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert "embed.weight" not in f.keys()  # noqa: SIM118
    reloaded = load_compressed(path, lambda: TiedLM(tie=False))
    assert reloaded.lm_head.weight is reloaded.embed.weight
    assert torch.equal(get_mask(reloaded.lm_head), get_mask(model.lm_head))
    assert torch.equal(reloaded(IDS), model(IDS))


@pytest.mark.parametrize("second_order", [False, True])
def test_pruned_and_quantized_layers_keep_their_zeros_and_masks_through_the_file(tmp_path, second_order):
    """A layer pruned then quantized is stored as its codes plus its mask (GPTQ may move pruned weights off zero:
    the mask clears them); a layer only pruned is stored sparse; both masks come back armed."""
    from trainlab.compress import compress

    model = TiedLM(tie=False)
    calibration = [IDS, IDS.flip(0)]
    plan = [("hidden", "magnitude", 0.5), ("hidden", "rtn", 3), ("lm_head", "nm", "2:4")]
    result = compress(model, plan, calibration=calibration, second_order=second_order, runtime="float")
    path = tmp_path / "pq.safetensors"
    size = save_quantized_model(result, path)
    _, packed = load(path)
    assert packed["hidden.weight"].kind == "masked" and packed["lm_head.weight"].kind == "nm"
    hidden = packed["hidden.weight"]
    assert size == hidden.nbytes() + packed["lm_head.weight"].nbytes() + _plain_bytes(
        model, skip={"hidden.weight", "lm_head.weight"}
    ) + header_bytes(path)
    reloaded = load_quantized_model(path, lambda: TiedLM(tie=False), runtime="float")
    assert torch.equal(get_mask(reloaded.hidden), get_mask(result.model.hidden))
    assert torch.equal(get_mask(reloaded.lm_head), get_mask(result.model.lm_head))
    for (k, a), b in zip(result.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert bool((reloaded.hidden.weight[~get_mask(reloaded.hidden)] == 0).all())


def test_writes_are_atomic(tmp_path):
    path = tmp_path / "m.safetensors"
    save(path, {"a": torch.ones(4)})
    before = path.read_bytes()
    bad = quantize_rtn(torch.randn(4, 8, dtype=torch.float64), 4, scale_dtype=None)  # scales not float16-exact
    with pytest.raises(ValueError, match=r"packed\['w'\] \(uniform\): scale is not exactly representable"):
        save(path, {"a": torch.zeros(4)}, {"w": bad})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    save(path, {"a": torch.zeros(4)})
    assert torch.equal(load(path)[0]["a"], torch.zeros(4))


def test_only_real_sharing_makes_an_alias(tmp_path):
    w = torch.randn(4, 4)
    views = {"a": w, "b": w.view(4, 4), "t": w.t(), "row": w[1], "e1": torch.empty(0), "e2": torch.empty(0)}
    assert shared_aliases(views) == {"b": "a"}  # same memory, same view; transposes, slices and empties are not
    save(tmp_path / "v.safetensors", views, aliases={"c": "b"})  # overlapping views: copies; c -> b -> a
    state, _ = load(tmp_path / "v.safetensors")
    assert state["c"] is state["b"] is state["a"] and all(torch.equal(state[k], v) for k, v in views.items())


def test_dequantized_shares_one_tensor_between_aliases(tmp_path):
    q = quantize_rtn(torch.randn(8, 8), 4)
    save(tmp_path / "q.safetensors", {}, {"a": q, "b": q})
    state, packed = load(tmp_path / "q.safetensors")
    assert packed["a"] is packed["b"]
    full = dequantized(state, packed)
    assert full["a"] is full["b"] and torch.equal(full["a"], q.dequantize())


def test_bad_input_is_named(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="reserved key"):
        save(path, {"a": torch.ones(1)}, metadata={META_KEY: "{}"})
    with pytest.raises(ValueError, match="strings to strings"):
        save(path, {"a": torch.ones(1)}, metadata={"n": 3})
    with pytest.raises(ValueError, match="alias must be a new name"):
        save(path, {"a": torch.ones(1)}, aliases={"b": "missing"})
    with pytest.raises(ValueError, match="unknown packed format kind 'zip'"):
        format_of("zip")
    with pytest.raises(ValueError, match="already registered"):
        register_format("uniform")(
            type("Other", (), {m: None for m in ("to_tensors", "metadata", "from_tensors", "nbytes", "dequantize")})
        )
    with pytest.raises(TypeError, match="lacks"):
        register_format("new-kind")(type("Half", (), {"to_tensors": None}))
    save_file({"w": torch.ones(2)}, str(path), metadata={"trainlab.quant": "{}"})
    with pytest.raises(ValueError, match="older trainlab"):
        load(path)
    save_file({"w": torch.ones(2)}, str(path))  # any plain safetensors file: tensors only
    state, packed = load(path)
    assert torch.equal(state["w"], torch.ones(2)) and packed == {}


def test_nm_encoding_needs_whole_groups():
    w = torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, ::2] = False
    enc = encode_sparse(w * mask, mask, "auto", (2, 4))  # 6 inputs are not whole groups of 4: bitmask/CSR
    assert enc.kind in ("bitmask", "csr") and math.prod(enc.mask.shape) == 24
