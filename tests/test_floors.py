"""The floors of the import graph (docs/architecture.md), read from every module's source with ``ast``.

From the ground up: ``runtime`` (imports no trainlab module) < the methods (every other package or module:
optim, compress, adapters, ..., losses) < ``lab`` < ``claims`` < ``cli``. A module imports only its own floor
or lower ones, and no two modules import each other, directly or around a loop. Every ``import`` statement
counts, module-level or inside a function; ``importlib.import_module`` calls on names held in variables (lazy
registration) are not statements and are not seen.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FLOORS = {"runtime": 0, "lab": 2, "claims": 3, "cli": 4}  # anything else under trainlab/ is a method: floor 1
METHOD_FLOOR = 1
FLOOR_NAMES = {0: "runtime", 1: "methods", 2: "lab", 3: "claims", 4: "cli"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line of the import statement


def module_files() -> dict[str, Path]:
    """Module name -> file for every module under src/trainlab (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((SRC / "trainlab").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        yield candidate if candidate in modules else base  # `from pkg import submodule` imports the submodule


def import_edges() -> list[Edge]:
    files = module_files()
    modules = set(files)
    edges: dict[Edge, None] = {}  # ordered and without repeats
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node, module, path.name == "__init__.py", modules):
                    while target and target not in modules and target.startswith("trainlab."):
                        target = target.rpartition(".")[0]  # `import trainlab.x.attr`-style: the module part
                    if target in modules and target != module and target != "trainlab":
                        edges[Edge(module, target, f"{path.relative_to(SRC.parent)}:{node.lineno}")] = None
    return list(edges)


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], METHOD_FLOOR) if len(parts) > 1 else FLOORS["cli"]


def floor_violations(edges: list[Edge]) -> list[str]:
    out = []
    for e in edges:
        src, dst = floor(e.source), floor(e.target)
        if src == FLOORS["runtime"]:
            out.append(f"{e.where}: {e.source} imports {e.target}; runtime is the ground floor and imports no trainlab")
        elif dst > src:
            out.append(
                f"{e.where}: {e.source} ({FLOOR_NAMES[src]}) imports {e.target} ({FLOOR_NAMES[dst]}), a higher floor"
            )
    return out


def strongly_connected(nodes: set[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One import loop through the component's first module (breadth-first, so a shortest one)."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ()) & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


def import_cycles(edges: list[Edge]) -> list[str]:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        where.setdefault((e.source, e.target), e.where)
    out = []
    for component in strongly_connected(set(module_files()), graph):
        loop = cycle_in(component, graph)
        steps = ", ".join(f"{a} -> {b} ({where[a, b]})" for a, b in zip(loop, loop[1:], strict=False))
        out.append(f"import cycle among {', '.join(component)}: {steps}")
    return out


def test_methods_never_import_the_lab_claims_or_cli_and_each_floor_only_looks_down():
    problems = floor_violations(import_edges())
    assert not problems, "imports across the floors (docs/architecture.md):\n" + "\n".join(problems)


def test_no_two_modules_import_each_other():
    problems = import_cycles(import_edges())
    assert not problems, "\n".join(problems)


def test_the_checker_sees_function_level_relative_and_package_imports(tmp_path, monkeypatch):
    root = tmp_path / "src" / "trainlab"
    for rel, text in {
        "__init__.py": "",
        "runtime.py": "",
        "compress/__init__.py": "",
        "compress/a.py": "def f():\n    from trainlab.lab import runner\n",
        "compress/b.py": "from . import c\n",
        "compress/c.py": "import trainlab.compress.b\n",
        "lab/__init__.py": "",
        "lab/runner.py": "from trainlab.claims.registry import x\nfrom trainlab import runtime\n",
        "claims/__init__.py": "",
        "claims/registry.py": "",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "src")
    edges = import_edges()
    assert {(e.source, e.target) for e in edges} == {
        ("trainlab.compress.a", "trainlab.lab.runner"),
        ("trainlab.compress.b", "trainlab.compress.c"),
        ("trainlab.compress.c", "trainlab.compress.b"),
        ("trainlab.lab.runner", "trainlab.claims.registry"),
        ("trainlab.lab.runner", "trainlab.runtime"),
    }
    floors = floor_violations(edges)
    assert len(floors) == 2 and "compress.a (methods) imports trainlab.lab.runner (lab)" in floors[0]
    (cycle,) = import_cycles(edges)
    assert (
        "trainlab.compress.b -> trainlab.compress.c" in cycle and "trainlab.compress.c -> trainlab.compress.b" in cycle
    )


@pytest.mark.parametrize(
    ("module", "expected"),
    [("trainlab.runtime", 0), ("trainlab.losses", 1), ("trainlab.adapters.lora", 1), ("trainlab.cli.compress", 4)],
)
def test_floor_of_a_module(module, expected):
    assert floor(module) == expected
