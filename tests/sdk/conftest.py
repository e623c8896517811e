"""A real sandboxd process (the console entry point) for the SDK clients to drive.

The SDK reads its timeouts when it is imported, so they are set here first: a dead URL
then fails in about 3 s instead of the 120 s connect budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from langsmith.sandbox import AsyncSandbox, Sandbox

os.environ.setdefault("LANGSMITH_SANDBOX_WS_TIMEOUT_CONNECT_BUDGET", "3")

#: The SDK clients want a control-plane URL; nothing here ever calls it.
API = "http://127.0.0.1:9/api/v2/sandboxes"


@dataclass
class DaemonProcess:
    """sandboxd running as its own process; ``logs`` collects its JSON log lines."""

    process: subprocess.Popen[str]
    address: str
    logs: list[dict[str, object]] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"


#: How the daemon is started unless a test says otherwise: the package in this venv.
PYTHON_PROGRAM = (sys.executable, "-m", "sandboxd")


def start_daemon(
    *args: str, launcher: Sequence[str] = (), program: Sequence[str] = PYTHON_PROGRAM
) -> DaemonProcess:
    """Start ``[LAUNCHER] PROGRAM --listen 127.0.0.1:0 ARGS`` and wait for its address;
    its log lines are drained into ``logs`` from then on (an undrained pipe would block
    the daemon once full)."""
    proc = subprocess.Popen(
        [*launcher, *program, "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    logs: list[dict[str, object]] = []
    for line in proc.stderr:
        entry = json.loads(line)
        logs.append(entry)
        if entry.get("msg") == "listening":
            break
    else:
        raise RuntimeError(f"sandboxd did not start: {logs}")
    daemon = DaemonProcess(proc, str(logs[-1]["address"]), logs)

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # a launcher (unshare) may print plain text
            daemon.logs.append(json.loads(line) if line.startswith("{") else {"raw": line})

    daemon.reader = threading.Thread(target=drain, daemon=True)
    daemon.reader.start()
    return daemon


def stop_daemon(daemon: DaemonProcess) -> int:
    """SIGTERM, wait for the exit, and collect the last log lines."""
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=30)
    if daemon.reader is not None:
        daemon.reader.join(timeout=10)
    if daemon.process.stderr is not None:
        daemon.process.stderr.close()
    return code


@contextmanager
def daemon_process(
    *args: str, launcher: Sequence[str] = (), program: Sequence[str] = PYTHON_PROGRAM
) -> Iterator[DaemonProcess]:
    """``start_daemon`` for a ``with`` block; leaving it stops the daemon, which must exit
    0 having logged no error."""
    daemon = start_daemon(*args, launcher=launcher, program=program)
    try:
        yield daemon
    finally:
        assert stop_daemon(daemon) == 0
        errors = [e for e in daemon.logs if e.get("level") in ("error", "critical")]
        assert errors == [], [e.get("exc", e) for e in errors[:3]]


def sdk_sandbox(url: str, api_key: str = "dummy-api-key") -> Sandbox:
    """The released Python SDK's ``Sandbox`` on the daemon at ``url``."""
    from langsmith.sandbox import Sandbox, SandboxClient

    client = SandboxClient(api_key=api_key, api_endpoint=API, max_retries=0)
    return Sandbox.from_dict(
        {"name": "local", "dataplane_url": url}, client=client, auto_delete=False
    )


def async_sdk_sandbox(url: str) -> AsyncSandbox:
    """The same with the SDK's async client."""
    from langsmith.sandbox import AsyncSandbox, AsyncSandboxClient

    client = AsyncSandboxClient(api_key="dummy-api-key", api_endpoint=API, max_retries=0)
    return AsyncSandbox.from_dict(
        {"name": "local", "dataplane_url": url}, client=client, auto_delete=False
    )


@pytest.fixture(scope="module")
def sandboxd() -> Iterator[DaemonProcess]:
    """One daemon per test module."""
    with daemon_process("--home", "/tmp", "--stop-grace", "1") as daemon:
        yield daemon
