"""bnkit's layers point one way, and no module imports itself back.

    reference  <-  kernels  <-  autograd  <-  functional  <-  nn  <-  utils  <-  api  <-  cli

A module may import from its own layer or from one to its left, never from one to its right,
and the imports between modules form no cycle. Every ``import`` statement counts, the ones inside
functions too: a lazy import that only dodges a cycle is still the cycle. The graph is read from
the sources' syntax trees, so nothing here imports the modules it checks.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import bnkit

# (layer, module prefixes), left to right. A prefix covers the module and everything under it,
# except the package root, which covers only its own __init__ (so a new module needs a place here).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the specification in plain torch
    ("reference", ("bnkit.reference",)),
    # backends: the compiled and triton kernels and their choice
    ("kernels", ("bnkit.kernels",)),
    # autograd Functions over a backend. fused.py holds the BN+activation Functions; distributed.py
    # the SyncBatchNorm Function and its collectives (documented as bnkit.distributed, so it stays
    # put).
    ("autograd", ("bnkit.autograd", "bnkit.fused", "bnkit.distributed")),
    ("functional", ("bnkit.functional",)),
    # modules. nonfinite.py is the modules' policy for non-finite running statistics (it names layers
    # of a model); documented as bnkit.nonfinite, so it stays beside the package root.
    ("nn", ("bnkit.nn", "bnkit.nonfinite")),
    ("utils", ("bnkit.utils",)),
    # the package root re-exports the public API from every layer below
    ("api", ("bnkit",)),
    # programs on top of the public API: the command line, what it explains, demos and benchmarks
    ("cli", ("bnkit.cli", "bnkit.__main__", "bnkit.explain", "bnkit.demo", "bnkit.bench")),
)

# Cycles tolerated, each one strongly connected set of modules: none.
ALLOWED_CYCLES: frozenset[frozenset[str]] = frozenset()

Edge = tuple[str, str, int]  # (importer, imported, line)


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (whose directory is ``root``), by dotted name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_edges(modules: dict[str, Path], package: str) -> list[Edge]:
    """Each import of a module of ``package`` by another, at any depth of the source (lazy imports too).

    ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``; a name that is no
    module of the package resolves to its longest dotted prefix that is one.
    """

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = set()
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" for alias in node.names] or [source]
                targets = [t if t in modules else source for t in targets]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    resolved = resolve(target)
                    if resolved is not None and resolved != name:
                        edges.add((name, resolved, node.lineno))
    return sorted(edges)


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the longest prefix that covers ``module``."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or ("." in prefix and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def cycles(edges: list[Edge]) -> list[frozenset[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm, iterative)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def upward(edges: list[Edge]) -> list[str]:
    """Each import that points from a layer to one on its right, as ``importer:line -> imported``."""
    wrong = []
    for a, b, line in edges:
        la, lb = layer_of(a), layer_of(b)
        if la is not None and lb is not None and lb > la:
            wrong.append(f"{a}:{line} ({LAYERS[la][0]}) -> {b} ({LAYERS[lb][0]})")
    return wrong


ROOT = Path(bnkit.__file__).parent
MODULES = package_modules(ROOT, "bnkit")
EDGES = import_edges(MODULES, "bnkit")


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_imports_point_left():
    assert upward(EDGES) == []


def test_no_import_cycles():
    assert [sorted(c) for c in cycles(EDGES) if c not in ALLOWED_CYCLES] == []


def test_the_checker_sees_lazy_imports_cycles_and_upward_imports(tmp_path):
    # a fake package: reference imports nn inside a function; nn imports reference back
    pkg = tmp_path / "bnkit"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nn" / "__init__.py").write_text("from .batchnorm import BatchNorm\n")
    (pkg / "nn" / "batchnorm.py").write_text("from bnkit import reference as ref\nBatchNorm = ref\n")
    (pkg / "reference.py").write_text(textwrap.dedent("""\
        def f():
            from bnkit.nn.batchnorm import BatchNorm
            return BatchNorm
    """))
    modules = package_modules(pkg, "bnkit")
    edges = import_edges(modules, "bnkit")
    assert sorted(edges) == [
        ("bnkit.nn", "bnkit.nn.batchnorm", 1),
        ("bnkit.nn.batchnorm", "bnkit.reference", 1),
        ("bnkit.reference", "bnkit.nn.batchnorm", 2),
    ]
    assert cycles(edges) == [frozenset({"bnkit.nn.batchnorm", "bnkit.reference"})]
    assert upward(edges) == ["bnkit.reference:2 (reference) -> bnkit.nn.batchnorm (nn)"]


@pytest.mark.parametrize("module, layer", [
    ("bnkit", "api"),
    ("bnkit.functional.standard", "functional"),
    ("bnkit.kernels.cpu", "kernels"),
    ("bnkit.nonfinite", "nn"),
    ("bnkit.bench.cpu", "cli"),
])
def test_layer_of_takes_the_longest_prefix(module, layer):
    assert LAYERS[layer_of(module)][0] == layer


def test_a_new_module_beside_the_root_has_no_layer_until_placed():
    assert layer_of("bnkit.newmodule") is None
