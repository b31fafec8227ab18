"""The layering of pipelines/: no module imports, directly or through others, a module that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipelines"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every pipelines module `path` imports: at module level, under `if TYPE_CHECKING:` and inside
    functions. A circle closed only for the type checker, or only by deferring one import into a
    function, is still two modules that each need the other: the first returns as a real circle when
    an annotation turns into a call, the second when the import moves up. Imports are deferred for
    start-up time (a CLI command imports its stage when it runs), never to hide a circle."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # `from pipelines.catalog import models` names a module, `... import Catalog` a name in one.
                for alias in child.names:
                    named = f"{child.module}.{alias.name}"
                    found.add(named if named in modules else child.module)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_walk_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_walk_reads_type_checking_and_deferred_imports() -> None:
    graph = import_graph()
    assert "pipelines.runtime" in graph["pipelines.lifecycle.operations"]  # under TYPE_CHECKING
    assert "pipelines.billing.history" in graph["pipelines.accounts"]  # inside upsert_accounts


def test_no_import_circle_in_pipelines() -> None:
    assert circles(import_graph()) == []
