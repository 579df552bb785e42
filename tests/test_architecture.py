"""The import structure the docs promise (docs/architecture.md): no cycles between files or between
folders of the library, few function-level imports of our own modules, and tests that import no
other test module. Read from the source with `ast`, independently of Python's import machinery."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bitsmoe_jax", "pallas_kernels", "conversion")
MAX_FUNCTION_LEVEL_IMPORTS = 8


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _own(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> modules it imports anywhere, [(module, imported) of imports inside functions])."""
    edges: dict[str, set[str]] = defaultdict(set)
    lazy = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        functions = [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = _own(name, mods)
                if target and target != mod:
                    edges[mod].add(target)
                    if id(node) in inside:
                        lazy.append((mod, target))
    return edges, lazy


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_of(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_cycles_between_files():
    mods = _modules()
    edges, _ = _imports(mods)
    # a package's __init__ and its own submodules are one unit
    graph = {
        a: {b for b in bs if not (_is_package_of(a, b) or _is_package_of(b, a))}
        for a, bs in edges.items()
    }
    assert _cycles(graph) == []


def test_no_import_cycles_between_folders():
    mods = _modules()
    edges, _ = _imports(mods)

    def folder(m: str) -> str:
        return m if mods[m].name == "__init__.py" else m.rpartition(".")[0]

    graph: dict[str, set[str]] = defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            fa, fb = folder(a), folder(b)
            if fa != fb and not (_is_package_of(fa, fb) or _is_package_of(fb, fa)):
                graph[fa].add(fb)
    assert _cycles(graph) == []


def test_few_function_level_imports_of_our_own_modules():
    _, lazy = _imports(_modules())
    assert len(lazy) <= MAX_FUNCTION_LEVEL_IMPORTS, lazy


def test_tests_import_no_test_module():
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("tests.")
            ):
                if node.module.rpartition(".")[2].startswith("test_"):
                    offenders.append((str(path.relative_to(ROOT)), node.module))
    assert offenders == []


def test_the_checker_finds_a_cycle():
    """The cycle finder itself, on a graph with a known cycle (so the tests above can fail)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
