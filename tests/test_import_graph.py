"""The package's modules import each other without a cycle, function-level (lazy) imports included.

A cycle works only as long as the modules in it happen to be imported in the right order, and
hides which layer depends on which. The graph is built from the source with ``ast`` (nothing is
imported): every ``import`` and ``from ... import`` statement, wherever it sits, except those under
``if TYPE_CHECKING:`` (never run). An import of ``a.b.c`` depends on ``a.b.c`` and on each
package above it that is not above the importer too (importing ``a.b.c`` first runs
``a/b/__init__.py``); ``from a.b import name`` depends on the submodule ``a.b.name`` if there is
one, else on ``a/b/__init__.py``, which defines or re-exports ``name``. An explicit import of a
package above the importer (``from tardis_compiler import x`` in a submodule) counts too. Imports
by name at run time (``importlib.import_module``: only ``tardis eval --import``'s user modules) are
not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

import tardis_compiler

ROOT = Path(tardis_compiler.__file__).resolve().parent
PACKAGE = "tardis_compiler"


def _module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``'s)."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((PACKAGE, *parts))] = path
    return names


MODULES = _module_names()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.AST):
    """Every import statement in ``tree``, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch does run
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(importer: str, level: int, module: str | None) -> str:
    """The dotted name a (possibly relative) ``from`` import refers to."""
    if level == 0:
        return module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _with_packages(importer: str, target: str) -> set[str]:
    """``target`` and the packages above it that are not above ``importer`` (those are already
    running when ``importer`` runs)."""
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    parts = target.split(".")
    out = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - own
    return {name for name in out | {target} if name in MODULES and name != importer}


def _dependencies(importer: str) -> set[str]:
    tree = ast.parse(MODULES[importer].read_text(), filename=str(MODULES[importer]))
    deps: set[str] = set()
    for node in _import_statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    deps |= _with_packages(importer, alias.name)
            continue
        base = _absolute(importer, node.level, node.module)
        if base.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            deps |= _with_packages(importer, submodule if submodule in MODULES else base)
    return deps


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    return {name: _dependencies(name) for name in MODULES}


def knots(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with a cycle: more than one module, or a module that
    imports itself (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per knot (see ``knots``)."""
    return [_cycle_in(graph, knot) for knot in knots(graph)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search)."""
    start = min(component)
    parents: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:  # back at the start: walk the parents from ``node``
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    next_frontier.append(nxt)
        frontier = next_frontier
    return sorted(component)


def test_the_graph_sees_lazy_relative_and_package_imports():
    graph = import_graph()
    # A package import means its __init__; a function-level import counts like a module-level one.
    assert "tardis_compiler.calibrate" in graph["tardis_compiler.eval.tardis_method"]
    assert "tardis_compiler.runtime.pack" in graph["tardis_compiler.profile"]  # imported inside a method
    assert "tardis_compiler.runtime.ffn_op" in graph["tardis_compiler.passes.fold_ffns"]  # from ..runtime import ffn_op
    assert "tardis_compiler.runtime" in graph["tardis_compiler.passes.fold_ffns"]  # its package runs first
    assert "tardis_compiler.runtime.layout" not in graph["tardis_compiler.profile"]  # TYPE_CHECKING only
    # Packages above the importer have already run, unless it names one of them explicitly.
    assert _with_packages("tardis_compiler.eval.harness", "tardis_compiler.calibrate.record") == {
        "tardis_compiler.calibrate", "tardis_compiler.calibrate.record"}
    assert _with_packages("tardis_compiler.calibrate.drive", "tardis_compiler.calibrate.record") == {
        "tardis_compiler.calibrate.record"}
    assert _with_packages("tardis_compiler.calibrate.drive", "tardis_compiler") == {"tardis_compiler"}


def test_cycle_finder_reports_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    found = [(_cycle_in(graph, knot), knot) for knot in knots(graph)]
    assert not found, "import cycles:\n" + "\n".join(
        f"  {' -> '.join(cycle)}\n    (all {len(knot)} modules of this knot: {', '.join(sorted(knot))})"
        for cycle, knot in found)
