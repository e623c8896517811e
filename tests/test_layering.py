"""The core decides, the shell does: every module under ``sandboxd/core/`` imports only the
stdlib, msgspec and other core modules (design.md, "Modules"), and no module anywhere in the
package grows past 500 lines. This parses the imports of every file in the folder, so a new
core module is covered without editing a list."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "daemon" / "sandboxd"
CORE = PACKAGE / "core"
ALLOWED_THIRD_PARTY = {"msgspec"}
#: Standard library, but I/O, clocks or concurrency: the shell's business.
SHELL_STDLIB = {"subprocess", "socket", "time", "threading", "asyncio", "select"}


def imported_modules(source: str, package: list[str]) -> set[str]:
    """Absolute names of every module ``source`` imports, relative imports resolved as from
    a module of ``package`` (``["sandboxd", "core"]``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                names.add(node.module)
            else:
                base = package[: len(package) - node.level + 1]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


def forbidden_imports(source: str, package: list[str]) -> list[str]:
    """The imports of ``source`` that the core's rule does not allow."""
    forbidden = []
    for name in sorted(imported_modules(source, package)):
        parts = name.split(".")
        if parts[0] == "sandboxd":
            if parts[:2] != ["sandboxd", "core"]:
                forbidden.append(name)
        elif (
            parts[0] not in sys.stdlib_module_names and parts[0] not in ALLOWED_THIRD_PARTY
        ) or parts[0] in SHELL_STDLIB:
            forbidden.append(name)
    return forbidden


def core_modules() -> list[pathlib.Path]:
    return sorted(CORE.rglob("*.py"))


def test_the_core_folder_holds_the_core_modules() -> None:
    names = {p.stem for p in core_modules()}
    assert {"errors", "config", "messages", "ringbuffer", "session", "utf8"} <= names


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_module_imports_only_stdlib_msgspec_and_core(path: pathlib.Path) -> None:
    package = ["sandboxd", *path.relative_to(PACKAGE).parent.parts]
    assert forbidden_imports(path.read_text(), package) == []


def test_the_rule_catches_the_shells_world() -> None:
    """The checker itself: each forbidden kind of import is reported, allowed ones are not."""
    probe = (
        "import trio\nimport socket\nfrom time import monotonic\nimport psutil\n"
        "from hypercorn.config import Config\nfrom sandboxd.runtime import process\n"
        "from ..http import app\nimport json\nimport msgspec\nfrom . import errors\n"
        "from sandboxd.core.session import Session\n"
    )
    assert forbidden_imports(probe, ["sandboxd", "core"]) == [
        "hypercorn.config",
        "psutil",
        "sandboxd.http",
        "sandboxd.runtime",
        "socket",
        "time",
        "trio",
    ]


def test_every_module_stays_under_500_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 500} == {}
