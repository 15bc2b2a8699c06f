"""docs/distributed.md's support table (optimizers under DDP, FSDP2 and torch.compile) agrees with the tests that
establish each cell: every optimizer has one row, and each cell says what its test asserts.

The tests' own lists are read from their sources (no import: they fork processes at collection time otherwise):
``LEFT_OUT`` of test_ddp_optimizers.py, ``RUNS``/``STATEFUL`` of test_fsdp2.py, ``FAILS`` of
test_compile_support.py."""

import ast
from pathlib import Path

import pytest

from trainlab import optim

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "distributed.md"
HEADER = "| optimizer | DDP | FSDP2 (`fully_shard`) | `torch.compile(model)` (aot_eager) |"


def _literal(filename, name):
    tree = ast.parse((HERE / filename).read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{filename} defines no literal {name}")


def _table():
    lines = DOC.read_text().splitlines()
    start = lines.index(HEADER)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        first, *cells = (c.strip() for c in line.strip().strip("|").split(" | "))
        for name in (n.strip() for n in first.split(",")):
            assert name not in rows, f"{name} has two rows"
            rows[name] = dict(zip(("ddp", "fsdp2", "compile"), cells, strict=True))
    return rows


def test_every_optimizer_has_exactly_one_row():
    assert sorted(_table()) == sorted(optim.optimizer_names())


@pytest.mark.parametrize("name", optim.optimizer_names())
def test_ddp_cell_matches_test_ddp_optimizers(name):
    cell = _table()[name]["ddp"]
    if name in _literal("test_ddp_optimizers.py", "LEFT_OUT"):
        assert cell.startswith("not tested")
    else:
        assert cell == "bitwise equal"


@pytest.mark.parametrize("name", optim.optimizer_names())
def test_compile_cell_matches_test_compile_support(name):
    cell = _table()[name]["compile"]
    if name in _literal("test_compile_support.py", "FAILS"):
        assert cell.startswith("fails")
    else:
        assert cell == "bitwise equal to the uncompiled run"


@pytest.mark.parametrize("name", optim.optimizer_names())
def test_fsdp2_cell_matches_test_fsdp2(name):
    cell = _table()[name]["fsdp2"]
    runs = set(_literal("test_fsdp2.py", "RUNS")) | set(_literal("test_fsdp2.py", "STATEFUL"))
    if name in runs:
        assert cell.startswith("runs")
    else:
        assert cell.startswith("not tested")
