"""systemd readiness notifications and socket activation, against a socket the test
listens on (no systemd needed)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from sandboxd.runtime.notify import Notifier, activated_socket


def test_notifier_reads_path_abstract_and_watchdog_settings() -> None:
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "/run/x"}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@a", "WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    other = {"NOTIFY_SOCKET": "@a", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    assert Notifier(other).watchdog_interval is None  # meant for another process
    assert activated_socket({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(
    kind: str, tmp_path: pathlib.Path
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address: str = str(tmp_path / "notify")
        listener.bind(address)
        env_value = address
    else:
        name = f"sandboxd-test-{os.getpid()}-{time.monotonic_ns()}"
        listener.bind(b"\0" + name.encode())
        env_value = "@" + name
    listener.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    with listener, proc.stderr:
        port = int(json.loads(proc.stderr.readline())["address"].rsplit(":", 1)[1])
        first = listener.recv(4096).decode().splitlines()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # READY=1 came only once the port accepts
        assert first[0] == "READY=1" and first[1].startswith("STATUS=listening on 127.0.0.1:")
        watchdogs = [listener.recv(4096) for _ in range(3)]
        assert watchdogs == [b"WATCHDOG=1"] * 3
        proc.send_signal(signal.SIGTERM)
        seen = []
        while b"STOPPING=1" not in seen:
            seen += listener.recv(4096).split(b"\n")
        assert proc.wait(timeout=30) == 0


def test_socket_activation_uses_the_passed_socket(tmp_path: pathlib.Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    fd = server.fileno()
    launch = (  # as systemd hands it over: fd 3, and LISTEN_PID naming the daemon
        f"exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -m sandboxd "
        "--listen 127.0.0.1:1"  # ignored: the activated socket wins
    )
    proc = subprocess.Popen(
        ["/bin/bash", "-c", launch], pass_fds=(fd,), stderr=subprocess.PIPE, text=True
    )
    server.close()
    assert proc.stderr is not None
    with proc.stderr:
        first = json.loads(proc.stderr.readline())
        assert first["msg"] == "listening" and first["address"] == f"127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_the_unit_files_pass_systemd_analyze_verify(tmp_path: pathlib.Path) -> None:
    import shutil

    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make test` installs it (Debian: systemd)"
    units = pathlib.Path(__file__).parents[2] / "systemd"
    entry_point = pathlib.Path(sys.executable).parent / "sandboxd"
    for name in ("sandboxd.service", "sandboxd.socket"):
        text = (units / name).read_text().replace("/usr/local/bin/sandboxd", str(entry_point))
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", "sandboxd.socket", "sandboxd.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
