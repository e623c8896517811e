"""``sandboxd cp``: a binary file and a directory round-trip; stdin/stdout; nothing is
ever written outside the destination."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandboxd.client.connection import CliError
from sandboxd.client.copy import _safe_parts
from tests.client.conftest import RunCli


def test_a_binary_file_round_trips(cli: RunCli, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "blob").write_bytes(data)
    remote = f":{tmp_path}/remote/blob"
    assert cli("cp", str(tmp_path / "blob"), remote).returncode == 0
    assert cli("cp", remote, str(tmp_path / "back")).returncode == 0
    assert (tmp_path / "back").read_bytes() == data
    assert cli("cp", remote, "-").stdout == data
    assert cli("cp", "-", f":{tmp_path}/remote/piped", input=b"from stdin").returncode == 0
    assert (tmp_path / "remote" / "piped").read_bytes() == b"from stdin"


def test_a_directory_round_trips_with_r(cli: RunCli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.bin").write_bytes(os.urandom(1000))
    (src / "a" / "b" / "deep.txt").write_text("deep\n")
    (src / "a" / "empty").mkdir()
    assert cli("cp", str(src), f":{tmp_path}/r/x").returncode == 125  # a directory needs -r
    assert cli("cp", "-r", str(src), f":{tmp_path}/r/").returncode == 0
    assert (tmp_path / "r" / "src" / "a" / "b" / "deep.txt").read_text() == "deep\n"
    out = tmp_path / "out"
    assert cli("cp", "-r", f":{tmp_path}/r/src", str(out)).returncode == 0
    for path in src.rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(src)).read_bytes() == path.read_bytes()
    # /upload writes files only: an empty directory is not created on the way in
    assert not (tmp_path / "r" / "src" / "a" / "empty").exists()


def test_copying_out_never_follows_a_symlink_planted_in_the_destination(
    cli: RunCli, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    (remote / "sub").mkdir(parents=True)
    (remote / "sub" / "f").write_text("payload")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    (dest / "remote").mkdir(parents=True)
    (dest / "remote" / "sub").symlink_to(outside)  # planted where sub/f would go
    done = cli("cp", "-r", f":{remote}", str(dest))
    assert done.returncode == 125 and b"not a directory" in done.stderr
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "a//b", "."])
def test_a_remote_name_that_would_escape_is_refused(name: str) -> None:
    with pytest.raises(CliError, match="escape"):
        _safe_parts(name)
