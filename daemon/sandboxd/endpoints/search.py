"""``POST /glob`` and ``POST /grep`` (protocol.md §5.5, §5.6).

Both walk the tree below an absolute directory in a worker thread, in sorted order,
without following symlinked directories (so symlink cycles cannot loop) and skipping
directories they cannot read. Each stops at its result cap or its deadline and says so
with ``truncated``; ``truncated`` is never true unless a further match existed or the
deadline cut the walk short. grep skips binary files (a NUL byte in the first 8 KiB)
and reports at most ``GREP_LINE_CHARS`` characters of a line.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import msgspec
import trio

from sandboxd.core.errors import FileNotFound, InvalidRequest, PermissionDenied
from sandboxd.core.paths import GlobPattern, absolute_dir, compile_glob, grep_filter

DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000
GREP_LINE_CHARS = 10_000
BINARY_SNIFF = 8192


class GlobRequest(msgspec.Struct, forbid_unknown_fields=False):
    """Body of ``POST /glob``."""

    pattern: str
    path: str
    limit: int | None = None


class GrepRequest(msgspec.Struct, forbid_unknown_fields=False):
    """Body of ``POST /grep``."""

    pattern: str
    path: str
    glob: str | None = None
    limit: int | None = None


def _limit(requested: int | None) -> int:
    if requested is None:
        return DEFAULT_LIMIT
    if requested < 1:
        raise InvalidRequest("limit must be at least 1")
    return min(requested, MAX_LIMIT)


def _check_root(root: str) -> None:
    try:
        info = os.stat(root)
    except FileNotFoundError:
        raise FileNotFound(f"{root}: no such directory") from None
    except PermissionError:
        raise PermissionDenied(f"{root}: permission denied") from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidRequest(f"{root} is not a directory")


def _walk(root: str, max_depth: int | None) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(relative path, entry) of everything below ``root``, depth first, sorted."""
    stack: list[tuple[str, str, int]] = [(root, "", 1)]
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue  # unreadable or vanished: skipped, not fatal
        subdirs: list[tuple[str, str, int]] = []
        for entry in entries:
            relative = prefix + entry.name
            yield relative, entry
            try:
                real_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_dir = False
            if real_dir and (max_depth is None or depth < max_depth):
                subdirs.append((entry.path, relative + "/", depth + 1))
        stack.extend(reversed(subdirs))


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat().replace("+00:00", "Z")


def glob_tree(root: str, pattern: GlobPattern, limit: int, deadline: float) -> dict[str, object]:
    """Everything below ``root`` whose relative path matches ``pattern``."""
    _check_root(root)
    matches: list[dict[str, object]] = []
    truncated = False
    for count, (relative, entry) in enumerate(_walk(root, pattern.max_depth)):
        if count % 256 == 0 and time.monotonic() > deadline:
            truncated = True
            break
        if not pattern.matches(relative):
            continue
        if len(matches) >= limit:
            truncated = True
            break
        try:
            info = entry.stat()
        except OSError:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
        is_dir = stat.S_ISDIR(info.st_mode)
        matches.append(
            {
                "path": entry.path,
                "is_dir": is_dir,
                "size_bytes": 0 if is_dir else info.st_size,
                "modified_at": _rfc3339(info.st_mtime),
            }
        )
    return {"matches": matches, "truncated": truncated}


def grep_tree(
    root: str, needle: str, file_filter: str | None, limit: int, deadline: float
) -> dict[str, object]:
    """Lines containing ``needle`` (literally) in the text files below ``root``."""
    _check_root(root)
    wanted = needle.encode()
    pattern, on_basename = grep_filter(file_filter)
    matches: list[dict[str, object]] = []
    truncated = False
    for count, (relative, entry) in enumerate(_walk(root, None)):
        if count % 64 == 0 and time.monotonic() > deadline:
            truncated = True
            break
        if pattern is not None and not pattern.matches(entry.name if on_basename else relative):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            with open(entry.path, "rb") as handle:
                if b"\0" in handle.read(BINARY_SNIFF):
                    continue
                handle.seek(0)
                for number, line in enumerate(handle, start=1):
                    if wanted not in line:
                        continue
                    if len(matches) >= limit:
                        return {"matches": matches, "truncated": True}
                    text = line.rstrip(b"\n").rstrip(b"\r").decode("utf-8", "replace")
                    matches.append(
                        {"path": entry.path, "line": number, "text": text[:GREP_LINE_CHARS]}
                    )
                    if time.monotonic() > deadline:
                        return {"matches": matches, "truncated": True}
        except OSError:
            continue  # unreadable or vanished: skipped
    return {"matches": matches, "truncated": truncated}


async def glob(request: GlobRequest, deadline_seconds: float) -> dict[str, object]:
    """Run a glob in a worker thread, bounded by ``deadline_seconds``."""
    root = absolute_dir(request.path)
    pattern = compile_glob(request.pattern)
    deadline = time.monotonic() + deadline_seconds
    return await trio.to_thread.run_sync(
        glob_tree, root, pattern, _limit(request.limit), deadline, abandon_on_cancel=True
    )


async def grep(request: GrepRequest, deadline_seconds: float) -> dict[str, object]:
    """Run a grep in a worker thread, bounded by ``deadline_seconds``."""
    root = absolute_dir(request.path)
    if not request.pattern:
        raise InvalidRequest("pattern must not be empty")
    if "\0" in request.pattern:
        raise InvalidRequest("pattern contains a NUL byte")
    grep_filter(request.glob)  # refuse a bad filter before walking
    deadline = time.monotonic() + deadline_seconds
    return await trio.to_thread.run_sync(
        grep_tree,
        root,
        request.pattern,
        request.glob,
        _limit(request.limit),
        deadline,
        abandon_on_cancel=True,
    )
