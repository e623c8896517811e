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

#: sandboxd's spawner helper (daemon/sandboxd/runtime/spawner.py), counted as its CPU.
HELPER_NAME = "sandboxd-spawner"


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
        """utime + stime of the server and of its helper processes still running
        (sandboxd's spawner helper: it does the spawns the daemon would)."""
        process = self.psutil
        times = process.cpu_times()
        total = float(times.user + times.system)
        for child in process.children():
            try:
                if child.cmdline()[:1] == [HELPER_NAME]:
                    helper = child.cpu_times()
                    total += float(helper.user + helper.system)
            except (psutil.Error, IndexError):
                continue
        return total

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
    if _listening(proc, port):
        return Server(proc, port)
    proc.kill()
    raise RuntimeError("websocketd did not start")


def _listening(proc: subprocess.Popen[bytes], port: int, seconds: float = 10.0) -> bool:
    """Whether ``proc`` accepts connections on ``port`` within ``seconds`` (False at once
    if it exits)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def nginx_path() -> str | None:
    """Debian's nginx (nginx-light), the download's anchor."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /put/ {{
            dav_methods PUT;
            client_max_body_size 0;
        }}
    }}
}}
"""


def start_nginx(prefix: str, root: str) -> Server:
    """nginx serving ``root`` on a free loopback port, with ``PUT /put/NAME`` writing
    there (the dav module); its config, pid and logs go in ``prefix``. Run as root, its
    worker is ``nobody``, so ``root`` and ``root/put`` must be readable (writable) by it."""
    path = nginx_path()
    if path is None:
        raise RuntimeError("nginx is not installed (make bench installs nginx-light)")
    port = free_port()
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    os.chmod(prefix, 0o755)  # the worker's temp files go under it
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(user=user, prefix=prefix, port=port, root=root))
    proc = subprocess.Popen(
        [path, "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    if _listening(proc, port):
        return Server(proc, port)
    proc.kill()
    proc.wait()
    with open(os.path.join(prefix, "error.log"), errors="replace") as log:
        raise RuntimeError(f"nginx did not start: {log.read()[-500:]}")
