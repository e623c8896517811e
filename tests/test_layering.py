"""The core decides, the shell does: core modules import only the stdlib, msgspec and
each other (design.md, "Modules"). This parses their imports and fails on any other."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "daemon" / "sandboxd"
CORE = [
    "errors",
    "config",
    "messages",
    "ringbuffer",
    "utf8",
    "session",
    "paths",
    "yamux",
    "expired",
    "environment",
]
ALLOWED_THIRD_PARTY = {"msgspec"}


def imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_only_stdlib_msgspec_and_core(module: str) -> None:
    forbidden = []
    for name in imported_modules(PACKAGE / f"{module}.py"):
        top = name.split(".")[0]
        if top == "sandboxd":
            if name.split(".")[1] not in CORE:
                forbidden.append(name)
        elif top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY:
            forbidden.append(name)
        elif top in {"subprocess", "socket", "time", "threading", "asyncio", "select"}:
            forbidden.append(name)  # stdlib, but I/O or clocks: the shell's business
    assert forbidden == []


def test_every_module_stays_under_500_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}
