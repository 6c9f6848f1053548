"""The import graph of the library: no module imports itself through others.

Read with `ast` (nothing is imported): an edge A → B for every `import robustft...` or
`from robustft... import` in A naming B; a package's `__init__` counts as the package, and
`from package import name` points at the submodule `name` where there is one. Imports under
`if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "robustft"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt], *, nested: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run: at module level (also inside module-level if/try/with),
    and with `nested` those inside functions and classes too."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(node.orelse, nested=nested)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if nested:
                yield from _imports(node.body, nested=nested)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    stmts = [c for c in children if isinstance(c, ast.stmt)]
                    handlers = [c for c in children if isinstance(c, ast.ExceptHandler)]
                    yield from _imports(stmts, nested=nested)
                    for handler in handlers:
                        yield from _imports(handler.body, nested=nested)
            if isinstance(node, ast.Match):
                for case in node.cases:
                    yield from _imports(case.body, nested=nested)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The robustft modules one import statement of `module` runs."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".")
        if MODULES[module].name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    if base not in MODULES:
        return []
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    named_attributes = any(f"{base}.{alias.name}" not in MODULES for alias in node.names)
    return [*found, base] if named_attributes or not found else found


def import_graph(*, nested: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = {
            target
            for node in _imports(tree.body, nested=nested)
            for target in _targets(module, node)
            if target != module
        }
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def test_the_graph_is_read() -> None:
    graph = import_graph(nested=False)
    assert "robustft.data.splits" in graph["robustft.data.registry"]
    assert "robustft.data.splits" in graph["robustft.data.imagefolder"]


def test_module_level_imports_form_no_cycle() -> None:
    cycle = find_cycle(import_graph(nested=False))
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_function_level_imports_form_no_cycle_either() -> None:
    # A function-local import that closes a cycle is a cycle put off, not removed.
    cycle = find_cycle(import_graph(nested=True))
    assert cycle is None, "import cycle (counting function-local imports): " + " → ".join(
        cycle or []
    )


def test_reading_a_generated_task_does_not_import_the_generator() -> None:
    # The registry is imported by the workflow at parse time and by every job.
    graph = import_graph(nested=True)
    assert "robustft.data.toyshift" not in reachable(graph, "robustft.data.registry")


def test_a_cycle_is_found_and_shown() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from robustft.data import toyshift_format", {"robustft.data.toyshift_format"}),
        ("from robustft.data.registry import load_split", {"robustft.data.registry"}),
        ("import robustft.data.splits", {"robustft.data.splits"}),
        ("from robustft import io", {"robustft.io"}),
        ("import numpy", set()),
    ],
)
def test_an_import_points_at_the_module_it_runs(source: str, expected: set[str]) -> None:
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.Import | ast.ImportFrom)
    assert set(_targets("robustft.report", node)) == expected
