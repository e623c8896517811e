"""``sandboxd upgrade``: live-upgrade a running daemon and wait until the new image serves.

``POST /admin/upgrade`` (with ``--artifact``, that file is the candidate), then ``GET
/healthz`` until ``generation`` reaches the one the daemon announced (exit 0) or
``last_upgrade`` says the upgrade was refused or rolled back (exit 1, its reason on
stderr). The systemd unit's ``ExecReload=`` runs it, so ``systemctl reload`` returns once
the new image serves.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sandboxd.client import http
from sandboxd.client.connection import CliError, Endpoint
from sandboxd.client.terminal import say

#: How long to wait for the new image.
WAIT_SECONDS = 120.0


def _health(endpoint: Endpoint) -> dict[str, Any] | None:
    try:
        health: dict[str, Any] = http.get_json(endpoint, "/healthz")
    except (CliError, ValueError):
        return None  # the swap under way: the port queues, a poll may be cut
    return health


def upgrade(endpoint: Endpoint, artifact: str | None) -> int:
    """Trigger the upgrade and wait for its outcome; the exit status."""
    body = b""
    if artifact is not None:
        try:
            with open(artifact, "rb") as handle:
                body = handle.read()
        except OSError as exc:
            raise CliError(f"cannot read {artifact}: {exc.strerror}") from None
    began = time.time()
    headers = {"Content-Type": "application/octet-stream"}
    try:
        answer = json.loads(http.request(endpoint, "POST", "/admin/upgrade", body, headers).read())
    except CliError as exc:
        say(f"sandboxd: upgrade refused: {exc.message}")
        return 1
    target = int(answer["generation"])
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        health = _health(endpoint)
        if health is not None:
            if int(health.get("generation", 0)) >= target:
                return 0
            last = health.get("last_upgrade") or {}
            if last.get("result") in ("refused", "rolled_back") and last.get("at", 0) >= began:
                say(f"sandboxd: upgrade {last['result']}: {last.get('reason')}")
                return 1
        time.sleep(0.1)
    say(f"sandboxd: no new image serving after {WAIT_SECONDS:.0f} s")
    return 1
