"""The two servers under test, started as real processes on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process: its URL for a command, and its own CPU and memory."""

    process: subprocess.Popen[bytes]
    port: int
    logs: list[str] = field(default_factory=list)

    @property
    def psutil(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def cpu_seconds(self) -> float:
        times = self.psutil.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.psutil.memory_info().rss)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_sandboxd(*args: str) -> Server:
    """sandboxd from this checkout, with its logs drained in the background."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "--listen", f"127.0.0.1:{port}", *args],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    server = Server(proc, port)
    first = proc.stderr.readline()
    if json.loads(first).get("msg") != "listening":
        raise RuntimeError(f"sandboxd did not start: {first!r}")

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if b'"level":"error"' in line:
                server.logs.append(line.decode())

    threading.Thread(target=drain, daemon=True).start()
    return server


def websocketd_path() -> str | None:
    return shutil.which("websocketd")


def start_websocketd(command: str, *, binary: bool) -> Server:
    """websocketd running ``bash -c command`` for every connection."""
    path = websocketd_path()
    if path is None:
        raise RuntimeError("websocketd is not installed (make bench installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [
            path,
            f"--port={port}",
            "--address=127.0.0.1",
            f"--binary={'true' if binary else 'false'}",
            "--loglevel=error",
            "/bin/bash",  # the shell sandboxd runs commands with (the SDKs' default)
            "-c",
            command,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ},
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Server(proc, port)
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("websocketd did not start")
