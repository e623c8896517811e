"""``sandboxd port-forward`` over ``/tunnel``: 10 MB each way arrive with the same sha256."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading

from tests.client.conftest import CLI, cli_env
from tests.sdk.conftest import DaemonProcess

SIZE = 10 * 1024 * 1024


def test_port_forward_carries_10_mb_each_way_intact(sandboxd: DaemonProcess) -> None:
    upload, download = os.urandom(SIZE), os.urandom(SIZE)
    received = hashlib.sha256()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                received.update(data)
            conn.sendall(download)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    forwarder = subprocess.Popen(
        [*CLI, "port-forward", f":{port}"],
        stdout=subprocess.PIPE,
        env=cli_env(sandboxd.url),
    )
    try:
        assert forwarder.stdout is not None
        line = forwarder.stdout.readline().decode()
        assert line.startswith("Forwarding from 127.0.0.1:") and line.endswith(f"-> {port}\n")
        local = int(line.split()[2].rsplit(":", 1)[1])
        got = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", local), timeout=60) as client:
            client.sendall(upload)
            client.shutdown(socket.SHUT_WR)
            while data := client.recv(65536):
                got.update(data)
        thread.join(timeout=60)
        assert received.hexdigest() == hashlib.sha256(upload).hexdigest()
        assert got.hexdigest() == hashlib.sha256(download).hexdigest()
    finally:
        forwarder.terminate()
        assert forwarder.wait(timeout=30) == 0
        assert forwarder.stdout is not None
        forwarder.stdout.close()
        server.close()
