"""The import graph of datus's own packages: no cycle, and no stage importing a command.

Read from the source (every ``import``, at module level or inside a function), so a lazy import
that closes a cycle counts too.
"""

from __future__ import annotations

import ast

from tests.generated import REPO

OWN = ("datus", "callbacks", "datamodules")
INSTALLED_AS = {"callbacks": "datus.callbacks", "datamodules": "datus.datamodules"}
"""Top-level folders of the repository installed as datus's sub-packages (pyproject.toml)."""
COMMANDS = {"datus.commands"}
"""Modules that parse a command's arguments: only the entry point may import them."""


def _modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for package in OWN:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            if package in INSTALLED_AS:
                name = INSTALLED_AS[package] + name[len(package) :]
            imported: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module)
                elif isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
            found[name] = {module for module in imported if module.split(".")[0] in OWN}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(module: str) -> str:
        while module and module not in modules:
            module = module.rpartition(".")[0]
        return module

    return {name: {owner(module) for module in imported} - {"", name} for name, imported in modules.items()}


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, " -> ".join([*path[path.index(target):], target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_stage_imports_a_command() -> None:
    graph = _graph()
    def is_command(module: str) -> bool:
        return any(module == command or module.startswith(command + ".") for command in COMMANDS)

    offenders = {
        name: sorted(filter(is_command, imported))
        for name, imported in graph.items()
        if not is_command(name) and name != "datus.__main__" and any(map(is_command, imported))
    }
    assert not offenders, offenders
