"""Pure helpers of the file endpoints: paths from requests, Range headers, ETags, and the
glob language of ``/glob`` and ``/grep`` (protocol.md §5).

Glob patterns are matched against a path relative to the search root: ``**`` stands for
any number of whole segments (none included), ``*`` and ``?`` stay within one segment,
``[...]`` is a character class (``[!...]`` negated). Leading dots are not special.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from functools import lru_cache

from sandboxd.core.errors import InvalidRequest


def resolve_path(raw: str | None, home: str, *, what: str = "path") -> str:
    """The absolute, normalised path a request names; relative paths start at ``home``."""
    if raw is None or raw == "":
        raise InvalidRequest(f"the {what} parameter is required")
    if "\0" in raw:
        raise InvalidRequest(f"the {what} contains a NUL byte")
    if not raw.startswith("/"):
        raw = posixpath.join(home, raw)
    normal = posixpath.normpath(raw)
    return normal[1:] if normal.startswith("//") else normal


def absolute_dir(raw: str | None) -> str:
    """The absolute directory of a glob/grep request; a relative one is refused."""
    if raw is None or raw == "":
        raise InvalidRequest("path is required: the absolute directory to search")
    if "\0" in raw:
        raise InvalidRequest("path contains a NUL byte")
    if not raw.startswith("/"):
        raise InvalidRequest(f"path must be absolute, got {raw!r}")
    return posixpath.normpath(raw) if raw != "/" else "/"


# ---- Range -------------------------------------------------------------------------


class RangeNotSatisfiable(Exception):
    """The Range cannot be served for a file of this size (answer 416)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str, size: int) -> ByteRange | None:
    """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range for a file of ``size`` bytes.

    ``None`` means "serve the whole file" (several ranges, which sandboxd does not
    combine). An end past EOF is clamped; a start at or past EOF, an empty suffix or a
    malformed range raises ``RangeNotSatisfiable``.
    """
    header = header.strip()
    if "," in header:
        return None
    match = _RANGE.fullmatch(header.replace(" ", ""))
    if match is None:
        raise RangeNotSatisfiable(f"malformed Range {header!r}")
    first, last = match.groups()
    if first == "" and last == "":
        raise RangeNotSatisfiable("empty Range")
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("empty suffix range")
        return ByteRange(max(0, size - suffix), size - 1, size)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiable(f"range starts at {start}, the file has {size} bytes")
    return ByteRange(start, end, size)


def make_etag(dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int, content: bytes) -> str:
    """A strong ETag from a file's identity, times and (for small files) its content."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(b"%d:%d:%d:%d:%d:" % (dev, ino, size, mtime_ns, ctime_ns))
    digest.update(content)
    return f'"{digest.hexdigest()}"'


def etag_matches(header: str, etag: str) -> bool:
    """Whether an If-None-Match / If-Range value names ``etag`` (strong comparison)."""
    candidates = [value.strip() for value in header.split(",")]
    return etag in candidates or "*" in candidates


# ---- glob --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlobPattern:
    """A compiled glob: ``matches(relative_path)`` and how deep a walk must go."""

    regex: re.Pattern[str]
    max_depth: int | None  # None: unbounded (the pattern has **)

    def matches(self, relative: str) -> bool:
        return self.regex.fullmatch(relative) is not None


def _segment_regex(segment: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            close = segment.find("]", i + 2 if segment[i + 1 : i + 2] in ("!", "^") else i + 1)
            if close == -1:
                out.append(re.escape(char))
            else:
                body = segment[i + 1 : close]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\")
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = close
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


@lru_cache(maxsize=256)
def compile_glob(pattern: str) -> GlobPattern:
    """Compile ``pattern``; raises ``InvalidRequest`` for an empty or absolute one."""
    if not pattern:
        raise InvalidRequest("pattern must not be empty")
    if "\0" in pattern:
        raise InvalidRequest("pattern contains a NUL byte")
    pattern = pattern.removeprefix("./").lstrip("/")
    segments = [s for s in pattern.split("/") if s != ""]
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append("(?:.*)" if last else "(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(segment) + ("" if last else "/"))
    regex = "".join(parts)
    try:
        compiled = re.compile(regex, re.DOTALL)
    except re.error as exc:
        raise InvalidRequest(f"bad pattern {pattern!r}: {exc}") from None
    depth = None if "**" in segments else len(segments)
    return GlobPattern(compiled, depth)


def grep_filter(glob: str | None) -> tuple[GlobPattern | None, bool]:
    """The file filter of ``/grep``: a bare pattern matches basenames at any depth, one
    with ``/`` or ``**`` matches the relative path. Returns (pattern, on_basename)."""
    if not glob:
        return None, False
    on_basename = "/" not in glob and "**" not in glob
    return compile_glob(glob), on_basename
