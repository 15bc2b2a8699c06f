"""The compression registry drives one test matrix: every allocator spends its budget exactly, every compressor
round-trips through save/load, every spec names its paper and needs, and the CLI offers exactly the registry."""

import math

import pytest
import torch
from torch import nn

from trainlab.compress import (
    Plan,
    allocate_plan,
    allocator_names,
    allocator_specs,
    compress,
    compressible_layers,
    compressor_names,
    get_compressor,
)
from trainlab.compress.registry import KINDS, LEVELS, NEEDS, SECOND_ORDER

# allocators' search sizes cut down so the matrix stays fast (the defaults are the papers')
FAST = {"evopress": {"generations": 2, "offspring": 4}}


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # layer sizes 1024, 4096, 1024: averages like 3.5 bits are exactly reachable
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(48, 16, generator=g), torch.randint(0, 16, (48,), generator=g)) for _ in range(n)]


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _sizes(model: nn.Module) -> dict[str, int]:
    return {k: m.weight.numel() for k, m in compressible_layers(model).items()}


@pytest.mark.parametrize("spec", allocator_specs(), ids=lambda s: f"{s.name}-{s.budget}")
def test_every_allocator_spends_its_budget_exactly(spec):
    model, calib = _model(), _batches()
    sizes = _sizes(model)
    total = sum(sizes.values())
    if spec.budget == "sparsity":
        for s in (0.3, 0.77):
            plan = allocate_plan(spec.name, model, sparsity=s, calibration=calib, **FAST.get(spec.name, {}))
            result = compress(model, plan)
            zeros = sum(int((m.weight == 0).sum()) for m in compressible_layers(result.model).values())
            assert zeros == round(s * total), (spec.name, s)
    else:
        for bits in (3, 3.5) if spec.name != "uniform" else (3, 4.0):
            plan = allocate_plan(spec.name, model, bits=bits, calibration=calib, **FAST.get(spec.name, {}))
            result = compress(model, plan, calibration=calib)
            per_weight = {
                r.pattern: sum(r.level) / len(r.level) if isinstance(r.level, list) else r.level for r in plan.rules
            }
            spent = sum(b * sizes[name] for name, b in per_weight.items())
            assert spent == bits * total, (spec.name, bits)
            assert result.report.mean_bits == pytest.approx(bits, abs=1e-12)


def _level(name: str):
    spec = get_compressor(name)
    return {"sparsity": 0.5, "pattern": "2:4", "column_bits": 3}.get(spec.level, (spec.bits or (3,))[0])


def _reload(name: str, result, make_model, path):
    """``result.save``: the one save path (packed, sparse and masked-packed layers; a sliced structured model
    with its architecture)."""
    from trainlab.compress.export import load_model
    from trainlab.compress.structured import load_structured

    assert result.save(path) == path.stat().st_size
    return load_structured(path) if get_compressor(name).kind == "structured" else load_model(path, make_model)


@pytest.mark.parametrize("name", compressor_names())
def test_every_compressor_round_trips_through_save_and_load(name, tmp_path):
    model, calib = _model(), _batches()
    spec = get_compressor(name)
    result = compress(model, Plan([(".*", name, _level(name))]), calibration=calib, loss=_loss)
    reloaded = _reload(name, result, _model, tmp_path / f"{name}.safetensors")
    x = calib[0][0]
    assert torch.equal(reloaded(x), result.model(x))
    if spec.kind == "quantizer":
        assert set(result.weights) == set(compressible_layers(model))
    elif spec.kind != "structured":
        assert result.report.sparsity == pytest.approx(0.5, abs=1e-12)
    else:
        assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", compressor_names())
def test_every_compressor_spec_is_complete(name):
    spec = get_compressor(name)
    assert spec.paper.strip() and spec.summary.strip()
    assert spec.kind in KINDS and spec.level in LEVELS and spec.second_order in SECOND_ORDER
    assert spec.needs <= set(NEEDS)
    if spec.second_order == "always" or "gradient" in spec.needs:
        assert "calibration" in spec.needs
    assert (spec.second_order == "always") == ("hessian" in spec.needs)
    assert (spec.kind == "quantizer") == (spec.level in ("bits", "column_bits"))
    for key, hp in spec.hyperparameters.items():
        assert hp.check(key, hp.default) == hp.default
    for bits in spec.bits or ():
        assert 2 <= bits <= 8


@pytest.mark.parametrize("spec", allocator_specs(), ids=lambda s: f"{s.name}-{s.budget}")
def test_every_allocator_spec_is_complete(spec):
    assert spec.paper.strip() and spec.summary.strip() and spec.budget in ("sparsity", "bits")
    assert spec.needs <= set(NEEDS)
    for key, hp in spec.hyperparameters.items():
        if hp.default is not None:
            assert hp.check(key, hp.default) == hp.default
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        allocate_plan(spec.name, _model(), **{spec.budget: 0.5 if spec.budget == "sparsity" else 3}, bogus=1)


def test_cli_choices_are_the_registry():
    import argparse

    from trainlab.cli.compress import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    choices = {a.dest: a.choices for a in parser._actions if a.choices is not None}
    assert list(choices["method"]) == compressor_names()
    assert list(choices["allocator"]) == allocator_names()


def test_hyperparameters_are_validated_by_the_spec():
    model = _model()
    with pytest.raises(ValueError, match="min_threshold must be a number in \\[0.0, 100.0\\]"):
        allocate_plan("global", model, sparsity=0.5, min_threshold=-1)
    with pytest.raises(ValueError, match="fraction must be a number in \\[0.0, 1.0\\]"):
        compress(model, [(".*", "gwq", 3)], calibration=_batches(), loss=_loss, options={"gwq": {"fraction": 2}})
    result = compress(model, [(".*", "gwq", 3)], calibration=_batches(), loss=_loss, options={"gwq": {"fraction": 0.1}})
    assert all(len(q.indices) == math.ceil(0.1 * q.base.codes.numel()) for q in result.weights.values())


def test_a_new_quantizer_is_one_registered_function(monkeypatch):
    """What a new quantizer's file holds: one decorated function. The plans, the allocators, the front door and
    the CLI take it from the registry with nothing else edited."""
    import argparse

    from trainlab.cli.compress import add_parser
    from trainlab.compress import registry
    from trainlab.compress.quant.grids import QuantizedWeight, UniformGrid

    monkeypatch.setattr(registry, "_COMPRESSORS", dict(registry._COMPRESSORS))

    @registry.register_compressor(
        "asym-rtn", paper="(test)", summary="asymmetric RTN", kind="quantizer", level="bits", grouped=True
    )
    def asym_rtn(weight: torch.Tensor, *, bits: int, group_size: int | None = None) -> QuantizedWeight:
        return UniformGrid(bits, symmetric=False, group_size=group_size).quantize(weight)

    model, calib = _model(), _batches()
    result = compress(model, [(".*", "asym-rtn", 3.0)], group_size=16, runtime="float")
    weight = result.model[2].weight
    assert max(len(torch.unique(g)) for g in weight.reshape(-1, 16)) <= 8 and result.report.mean_bits == 3
    plan = allocate_plan("hawq", model, bits=3.5, calibration=calib, compressor="asym-rtn")
    assert {r.compressor for r in plan.rules} == {"asym-rtn"}
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert "asym-rtn" in next(a.choices for a in parser._actions if a.dest == "method")
