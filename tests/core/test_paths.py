"""Paths from requests, Range headers, ETags and the glob language (pure functions)."""

from __future__ import annotations

import pytest

from sandboxd.core.errors import InvalidRequest
from sandboxd.core.paths import (
    ByteRange,
    RangeNotSatisfiable,
    absolute_dir,
    compile_glob,
    etag_matches,
    grep_filter,
    make_etag,
    parse_range,
    resolve_path,
)


def test_relative_paths_start_at_home_and_are_normalised() -> None:
    assert resolve_path("notes/a.txt", "/home/user") == "/home/user/notes/a.txt"
    assert resolve_path("/tmp/../etc/x", "/home/user") == "/etc/x"
    assert resolve_path("//tmp//x", "/home/user") == "/tmp/x"


@pytest.mark.parametrize("raw", [None, "", "a\0b"])
def test_missing_or_nul_paths_are_refused(raw: str | None) -> None:
    with pytest.raises(InvalidRequest):
        resolve_path(raw, "/home/user")


def test_search_roots_must_be_absolute() -> None:
    assert absolute_dir("/tmp/") == "/tmp"
    with pytest.raises(InvalidRequest, match="absolute"):
        absolute_dir("tmp")


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=4-7", 16, ByteRange(4, 7, 16)),
        ("bytes=10-100", 16, ByteRange(10, 15, 16)),  # end clamped, not refused
        ("bytes=13-", 16, ByteRange(13, 15, 16)),
        ("bytes=-3", 16, ByteRange(13, 15, 16)),
        ("bytes=-100", 16, ByteRange(0, 15, 16)),  # suffix larger than the file
        ("bytes=0-0,5-6", 16, None),  # several ranges: the whole file
    ],
)
def test_ranges(header: str, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=16-", "bytes=20-30", "bytes=-0", "bytes=5-2", "x=1-2"])
def test_unsatisfiable_or_malformed_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 16)


def test_content_range_header() -> None:
    assert ByteRange(4, 7, 16).content_range == "bytes 4-7/16"


def test_etags_are_quoted_strong_and_change_with_content_or_identity() -> None:
    base = make_etag(1, 2, 3, 4, 5, b"abc")
    assert base.startswith('"') and base.endswith('"') and not base.startswith("W/")
    assert make_etag(1, 2, 3, 4, 5, b"abd") != base
    assert make_etag(1, 9, 3, 4, 5, b"abc") != base
    assert etag_matches(f'"x", {base}', base) and etag_matches("*", base)
    assert not etag_matches('"other"', base)


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*", "a.txt", True),
        ("*", "dir/a.txt", False),
        ("*.py", ".hidden.py", True),
        ("**/*.py", "a.py", True),
        ("**/*.py", "x/y/z/a.py", True),
        ("src/**/test_*.py", "src/test_a.py", True),
        ("src/**/test_*.py", "src/a/b/test_a.py", True),
        ("src/**/test_*.py", "lib/test_a.py", False),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("[ab].txt", "b.txt", True),
        ("[!ab].txt", "c.txt", True),
        ("[!ab].txt", "a.txt", False),
        ("**", "any/depth/at/all", True),
        ("a/*", "a/b", True),
        ("a/*", "a/b/c", False),
        ("file(1).txt", "file(1).txt", True),
    ],
)
def test_glob_semantics(pattern: str, path: str, matches: bool) -> None:
    assert compile_glob(pattern).matches(path) is matches


def test_glob_depth_bounds_the_walk_unless_doublestar() -> None:
    assert compile_glob("*/*.py").max_depth == 2
    assert compile_glob("**/*.py").max_depth is None


def test_grep_filters_bare_patterns_on_basenames_and_others_on_paths() -> None:
    bare, on_basename = grep_filter("*.py")
    assert on_basename and bare is not None and bare.matches("a.py")
    nested, on_basename = grep_filter("src/*.py")
    assert not on_basename and nested is not None and nested.matches("src/a.py")
    assert grep_filter(None) == (None, False)


def test_empty_patterns_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        compile_glob("")
