"""The house stays tidy: no import circle inside ``src/mlwf``, no source file over 600 lines.

The import graph is read from the code's own syntax, not by importing it, so
an import inside a function (made lazily, at call time) or under
``if TYPE_CHECKING:`` is an arrow like any other: a circle hidden in a
function is still a circle. ``from pkg import name`` is an import of the
module ``pkg.name`` where there is one, else of ``pkg``; a package is its
``__init__.py``. Importing ``a.b.c`` is an arrow to ``a.b.c`` alone, not to
the packages above it (every submodule would otherwise sit in a circle with
an ``__init__.py`` that hands its names on).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "mlwf"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(circle: list[str], graph: dict[str, set[str]]) -> str:
    members = set(circle)
    arrows = [f"{a} -> {b}" for a in circle for b in sorted(graph[a] & members)]
    return f"{', '.join(circle)} ({'; '.join(arrows)})"


def test_the_circle_finder_sees_a_lazy_import_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_reads_imports_at_any_depth():
    graph = import_graph()
    assert "mlwf.settings" in graph["mlwf.storage"]  # a module-level import
    assert "mlwf.model" in graph["mlwf.cli.model"] or "mlwf.model.registry" in graph["mlwf.cli.model"]


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles inside src/mlwf (untie each: a module both sides use, a parameter " \
                      "instead of an import, or a move to where the name belongs):\n" + \
                      "\n".join(_describe(c, graph) for c in found)


def test_no_source_file_over_600_lines():
    too_long = {str(path.relative_to(SRC.parent)): n for path in sorted((SRC / PACKAGE).rglob("*.py"))
                if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not too_long, f"source files over {MAX_LINES} lines (split them along a seam a reader would guess): " \
                         f"{too_long}"
