"""The verified-candidate cache: an installed candidate that did not change since it
passed the pre-flight check is not checked again; any change to its files is."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import trio

from sandboxd.runtime import verified
from tests.helpers import exec_socket
from tests.runtime.test_upgrade import FAULT, _explained
from tests.sdk.conftest import DaemonProcess, daemon_process

SOURCE = Path(verified.__file__).resolve().parents[1]  # the sandboxd package


def _copy_package(root: Path) -> Path:
    shutil.copytree(SOURCE, root / "sandboxd", ignore=shutil.ignore_patterns("__pycache__"))
    return root / "sandboxd"


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_the_identity_changes_with_any_file_of_the_package(tmp_path: Path) -> None:
    package = _copy_package(tmp_path)
    argv = [sys.executable, "-m", "sandboxd", "--listen", "127.0.0.1:0"]
    search = [str(tmp_path)]
    first = verified.identity(argv, search)
    assert first is not None and first == verified.identity(argv, search)
    _touch(package / "runtime" / "resume.py")
    second = verified.identity(argv, search)
    assert second is not None and second != first
    (package / "core" / "extra.py").write_text("")
    assert verified.identity(argv, search) not in (first, second)


def test_the_identity_of_a_single_file_build_is_its_file(tmp_path: Path) -> None:
    artifact = tmp_path / "sandboxd"
    artifact.write_bytes(b"#!/bin/sh\n")
    first = verified.identity([str(artifact), "--listen", "127.0.0.1:0"], [str(tmp_path)])
    assert first is not None
    artifact.write_bytes(b"#!/bin/sh\n\n")
    assert verified.identity([str(artifact)], [str(tmp_path)]) not in (None, first)
    assert verified.identity([str(tmp_path / "gone")], [str(tmp_path)]) is None


def test_no_package_on_the_path_means_no_identity(tmp_path: Path) -> None:
    assert verified.identity([sys.executable, "-m", "sandboxd"], [str(tmp_path)]) is None


async def _upgrade(daemon: DaemonProcess, generation: int) -> str:
    """Trigger one upgrade; whether its pre-flight check ran ("run"/"skipped")."""
    daemon.process.send_signal(signal.SIGUSR2)
    while True:  # (the log, not /healthz: a poll can be cut by the exec)
        accepting = [e for e in daemon.logs if e.get("msg") == "upgrade timing"]
        if len(accepting) >= generation:
            break
        await trio.sleep(0.05)
    execs = [e for e in daemon.logs if e.get("msg") == "upgrade exec"]
    return str(execs[generation - 1]["preflight"])


async def test_an_unchanged_install_is_not_checked_again_and_a_changed_one_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FAULT, raising=False)
    package = _copy_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with daemon_process("--stop-grace", "1") as daemon, _explained(daemon, []):
        await _five_upgrades(daemon, package)


async def _five_upgrades(daemon: DaemonProcess, package: Path) -> None:
    with trio.fail_after(120):
        assert await _upgrade(daemon, 1) == "run"  # the first upgrade to it: checked
        assert await _upgrade(daemon, 2) == "skipped"
        assert await _upgrade(daemon, 3) == "skipped"
        _touch(package / "runtime" / "upgrade.py")
        assert await _upgrade(daemon, 4) == "run"
        assert await _upgrade(daemon, 5) == "skipped"
        commands = await _env_of_a_command(daemon.address)
        assert verified.VARIABLE not in commands  # (the commands never see it)


async def _env_of_a_command(address: str) -> str:
    async with exec_socket(f"ws://{address}/execute/ws") as client:
        await client.start(command="env", close_stdin=True)
        await client.recv_until("exit")
        return client.transcript.text("stdout")
