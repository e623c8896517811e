"""A real daemon process for the client tests, and the CLI run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.sdk.conftest import DaemonProcess, daemon_process

CLI = (sys.executable, "-m", "sandboxd")
RunCli = Callable[..., subprocess.CompletedProcess[bytes]]


def cli_env(url: str, **extra: str) -> dict[str, str]:
    """The environment of a CLI run against ``url`` (this worktree's source first)."""
    env = dict(os.environ)
    env.update({"SANDBOXD_URL": url, "SANDBOXD_TOKEN": "", **extra})
    return env


@pytest.fixture(scope="module")
def sandboxd() -> Iterator[DaemonProcess]:
    with daemon_process("--home", "/tmp", "--stop-grace", "1") as running:
        yield running


@pytest.fixture
def cli(sandboxd: DaemonProcess) -> RunCli:
    """``cli("exec", "--", "true")``: the CompletedProcess of a real CLI run."""

    def run(
        *args: str, input: bytes | None = None, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*CLI, *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            env=cli_env(sandboxd.url, **env),
            check=False,
        )

    return run
