"""Fixtures shared by every test module."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import psutil
import pytest

from tests.helpers import Daemon, running_daemon


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    """sandboxd with its default settings, in this test's trio run, on a free port."""
    async with running_daemon() as running:
        yield running


@dataclass(frozen=True)
class OtherUser:
    """A login the tests create: its ids, its extra group and its home directory."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]
    home: str


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """A second user with a home and a supplementary group, removed afterwards (root only)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a second user needs root and useradd")
    name = f"sbxt{os.getpid()}"
    extra = f"{name}x"
    subprocess.run(["groupadd", extra], check=True)
    try:
        subprocess.run(
            ["useradd", "--create-home", "--user-group", "--groups", extra, name], check=True
        )
        try:
            entry = pwd.getpwnam(name)
            groups = frozenset(os.getgrouplist(name, entry.pw_gid))
            assert grp.getgrnam(extra).gr_gid in groups
            yield OtherUser(name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)
        finally:
            for leftover in psutil.process_iter():  # what a failed test left running
                with contextlib.suppress(psutil.Error):
                    if leftover.uids().real == entry.pw_uid:
                        leftover.kill()
            subprocess.run(["userdel", "--remove", name], check=True, capture_output=True)
    finally:
        subprocess.run(["groupdel", extra], check=True)
