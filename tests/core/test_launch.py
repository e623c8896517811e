"""Which argv starts a shell command: plain ``-c`` below the argument limit, a loader above."""

from __future__ import annotations

import pytest

from sandboxd.core import launch


def command_of(size: int, tail: str = "é") -> str:
    """A command whose encoding is exactly ``size`` bytes (é is two bytes)."""
    return ":" * (size - len(tail.encode())) + tail


@pytest.mark.parametrize(
    ("size", "loader"),
    [(2, False), (131_071, False), (131_072, True), (7 * 1024 * 1024, True)],
)
def test_the_loader_starts_exactly_where_linux_refuses_one_argument(
    size: int, loader: bool
) -> None:
    command = command_of(size)
    assert len(launch.encoded(command)) == size
    assert launch.needs_loader(["/bin/bash", "-c", command]) is loader


def test_only_a_shell_c_command_is_ever_rewritten() -> None:
    long = command_of(200_000)
    assert not launch.needs_loader(["/bin/echo", long])
    assert not launch.needs_loader(["/bin/bash", "-x", long])
    assert not launch.needs_loader(["/bin/bash", "-c", long, "extra"])


def test_bash_gets_the_mapfile_loader_other_shells_the_posix_one() -> None:
    bash = launch.loader_argv("/usr/bin/bash", 3)
    dash = launch.loader_argv("/bin/sh", 4)
    assert bash[:2] == ["/usr/bin/bash", "-c"] and dash[:2] == ["/bin/sh", "-c"]
    assert "mapfile" in bash[2] and "<&3" in bash[2] and "exec 3<&-" in bash[2]
    assert "cat <&4" in dash[2] and "exec 4<&-" in dash[2] and "mapfile" not in dash[2]
    assert len(launch.encoded(bash[2])) < 1024  # fixed and short: never near the limit
