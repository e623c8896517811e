"""The verified-candidate cache: an installed candidate whose files did not change since
it last passed the pre-flight check need not be checked again.

A candidate's identity is a digest of cheap ``stat`` calls: the real path, device,
inode, size and mtime of its executable; for the pip install (``python -m sandboxd``)
the same of every file of the ``sandboxd`` package it will import and of every
directory on the import path (a ``pip install`` of any dependency changes its
site-packages directory); and the handover schema this image writes. The identity of
the candidate that passed crosses the exec in an environment variable, which the new
image takes out of its environment (commands never see it) and keeps only when it
adopted the state (a rollback or a fresh start forgets it). An uploaded artifact is
always checked.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from importlib.machinery import PathFinder

from sandboxd.core.handover import SCHEMA

#: The identity of the candidate that passed its pre-flight check (old image -> new).
VARIABLE = "SANDBOXD_UPGRADE_VERIFIED"


def _stat_line(path: str) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\n"


def _package_files(argv: Sequence[str], search: Sequence[str]) -> Iterable[str]:
    """The files of the ``sandboxd`` package ``argv`` will import, and the directories
    of the import path (empty when ``argv`` is not ``python ... -m sandboxd``)."""
    if "-m" not in argv or argv[argv.index("-m") + 1 : argv.index("-m") + 2] != ["sandboxd"]:
        return []
    spec = PathFinder.find_spec("sandboxd", list(search))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sandboxd package is not on the import path")
    files = [entry for entry in search if entry and os.path.isdir(entry)]
    for root in spec.submodule_search_locations:
        for top, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            files += [os.path.join(top, name) for name in sorted(names)]
    return files


def candidate_path() -> list[str]:
    """The import path a candidate started from here gets: this one, except that its
    first entry is the directory it starts in (``-m`` puts the working directory first,
    and the daemon works in ``/`` by then)."""
    if sys.flags.isolated or sys.flags.safe_path or not sys.path:
        return list(sys.path)
    return [os.getcwd(), *sys.path[1:]]


def identity(argv: Sequence[str], search: Sequence[str] | None = None) -> str | None:
    """The identity of the installed candidate ``argv`` (importing from ``search``,
    default ``candidate_path()``); None when it cannot be known (then it is checked)."""
    try:
        lines = [f"schema {SCHEMA}\n", _stat_line(argv[0])]
        lines += map(_stat_line, _package_files(argv, search or candidate_path()))
    except (OSError, IndexError, ValueError, ImportError):
        return None
    return hashlib.sha256("".join(lines).encode(errors="surrogateescape")).hexdigest()


def take_from_environment() -> str | None:
    """The verified identity the previous image passed on (removed from the environment)."""
    return os.environ.pop(VARIABLE, None) or None
