"""No import cycles among tunefile's own modules.

A cycle works until someone moves an import or runs a module as a script: `python -m tunefile.compiler.cli` ran
cli.py as __main__, runtime_commands.py imported a second copy of cli.py and registered `train` on that copy, so
the command was missing from the group that ran. The graph is read with ast, not by importing: every import
statement anywhere in a file counts (inside functions and `if TYPE_CHECKING:` too, where a cycle only waits for
someone to hoist the import).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The source folders and the package names pyproject.toml installs them as.
PACKAGES = {"compiler": "tunefile.compiler", "runtime": "tunefile.runtime", "schemas": "tunefile.schemas"}


@dataclass(frozen=True)
class Import:
    target: str  # the tunefile module this statement makes Python execute
    where: str  # repo-relative FILE:LINE of the statement


def source_modules() -> dict[str, Path]:
    """Every module under the source folders, by its dotted name (a package by its __init__.py)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def import_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of the module a `from … import` statement reads from."""
    if not node.level:
        return node.module or ""
    # `from . import`: the package a module sits in; for a package's __init__.py, the package itself.
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def import_targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) \
        -> set[str]:
    """The tunefile modules one import statement executes: `from pkg import name` imports pkg.name when that
    is a module, and pkg when name is an attribute of it."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules.keys()
    base = import_base(node, module, is_package)
    submodules = {f"{base}.{alias.name}" for alias in node.names}
    targets = submodules & modules.keys()
    if submodules - targets and base in modules:  # some names are attributes of base (or `*`)
        targets.add(base)
    return targets


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a tunefile module in MODULE's file, at any depth, with its FILE:LINE."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    return [Import(target, f"{path.relative_to(REPO)}:{node.lineno}")
            for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
            for target in sorted(import_targets(node, module, is_package, modules)) if target != module]


def import_graph() -> dict[str, list[Import]]:
    modules = source_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def strongly_connected(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that can each reach the others; a group of two or more is a
    cycle (or several knotted together)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for edge in graph[module]:
            if edge.target not in index:
                visit(edge.target)
                low[module] = min(low[module], low[edge.target])
            elif edge.target in on_stack:
                low[module] = min(low[module], index[edge.target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [group for group in groups if len(group) > 1]


def shortest_cycle(graph: dict[str, list[Import]], group: list[str]) -> list[Import]:
    """One shortest cycle through the group's first module, as the import statements that close it."""
    start, members = group[0], set(group)
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for edge in graph[module]:
                if edge.target == start:
                    return [*paths[module], edge]
                if edge.target in members and edge.target not in paths:
                    paths[edge.target] = [*paths[module], edge]
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def describe(graph: dict[str, list[Import]], group: list[str]) -> str:
    cycle = shortest_cycle(graph, group)
    steps = [group[0], *(f"-> {edge.target}   ({edge.where})" for edge in cycle)]
    others = f"\n  (the knot also holds: {', '.join(sorted(set(group) - {e.target for e in cycle}))})" \
        if len(cycle) < len(group) else ""
    return "\n  ".join(steps) + others


def cycles_touching(folder: str) -> list[list[str]]:
    package = PACKAGES[folder]
    return [group for group in strongly_connected(import_graph())
            if any(module == package or module.startswith(package + ".") for module in group)]


def test_the_graph_sees_relative_and_function_level_imports() -> None:
    """The parser must find edges, or an empty graph would pass the cycle tests below."""
    edges = {module: {edge.target for edge in imports} for module, imports in import_graph().items()}
    assert "tunefile.compiler.runtime_commands" in edges["tunefile.compiler.cli"]  # from .runtime_commands import
    assert "tunefile.compiler.cli_common" in edges["tunefile.compiler.runtime_commands"]
    assert "tunefile.compiler.pipeline" in edges["tunefile.compiler.cli_common"]  # inside a function
    assert "tunefile.runtime.train" in edges["tunefile.runtime.__main__"]  # `from .train import` in main()


def test_cli_and_runtime_commands_do_not_import_each_other() -> None:
    edges = {module: {edge.target for edge in imports} for module, imports in import_graph().items()}
    assert "tunefile.compiler.cli" not in edges["tunefile.compiler.runtime_commands"]


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_import_cycles(folder: str) -> None:
    graph = import_graph()
    groups = cycles_touching(folder)
    report = "\n".join(f"cycle {number}:\n  {describe(graph, group)}" for number, group in enumerate(groups, 1))
    assert not groups, f"{len(groups)} import cycle(s) through {folder}/ (move the shared code into a module " \
                       f"both import):\n{report}"
