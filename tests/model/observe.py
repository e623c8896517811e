"""Looking at the daemon process from outside: its sessions (``GET /sessions``), its open
fds and its children."""

from __future__ import annotations

import http.client
import json
import os
import time
from typing import Any

import psutil

from tests.helpers import command_processes


def sessions(address: str) -> dict[str, dict[str, Any]]:
    """``GET /sessions``, keyed by command id."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/sessions", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.status == 200, response.status
        rows = json.loads(response.read())["sessions"]
    finally:
        conn.close()
    return {row["command_id"]: row for row in rows}


def seconds_until_reaped(address: str, command_id: str, give_up: float) -> float:
    """How long until the daemon reaped the command (or forgot it); ``inf`` when that did
    not happen within ``give_up`` seconds."""
    start = time.monotonic()
    while True:
        row = sessions(address).get(command_id)
        elapsed = time.monotonic() - start
        if row is None or row["exit_code"] is not None:
            return elapsed
        if elapsed > give_up:
            return float("inf")
        time.sleep(0.02)


def fd_count(pid: int) -> int:
    """How many fds the process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def live_children(pid: int) -> list[psutil.Process]:
    """The process's descendants that are not zombies, but its spawner helper."""
    found = []
    for child in command_processes(psutil.Process(pid), recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def settle(check: Any, timeout: float) -> Any:
    """Poll ``check()`` until it returns something falsy; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
