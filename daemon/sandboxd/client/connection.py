"""The client's way to a daemon: an ``Endpoint`` (URL + token) for HTTP and WebSocket
requests, and a ``CommandStream``: one command's output over ``/execute/ws`` that
reattaches from the offsets already delivered when the connection drops.

Every failure the user must hear about becomes a ``CliError`` with one plain sentence;
``main.py`` prints it and exits 125.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from sandboxd.client.websocket import Closed, Rejected, Target, Unreachable, WebSocket

#: Exit status for a CLI, transport or daemon error (docker's convention).
EXIT_CLI_ERROR = 125
#: How long a lost connection is retried before the CLI gives up (SANDBOXD_RECONNECT_SECONDS).
RECONNECT_SECONDS = 30.0
FIRST_BACKOFF, MAX_BACKOFF = 0.1, 2.0


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


class CliError(Exception):
    """A failure reported as one line on stderr and exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_CLI_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _detail(body: bytes) -> str:
    """The message of a ``{"detail": {...}}`` error body, or ''."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return ""
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("error") or "")
    return str(detail) if isinstance(detail, str) else ""


class Endpoint:
    """A daemon (or a platform's dataplane URL) and the token sent as ``X-Api-Key``."""

    def __init__(self, url: str, token: str = "", connect_timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.connect_timeout = connect_timeout

    @property
    def target(self) -> Target:
        try:
            return Target.parse(self.url)
        except ValueError as exc:
            raise CliError(f"bad --url: {exc}") from None

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Api-Key": self.token} if self.token else {}

    def refused(self, status: int, body: bytes, what: str) -> CliError:
        """The error for an HTTP refusal of ``what``."""
        message = _detail(body)
        if status == 401:
            return CliError(
                f"the daemon at {self.url} refused the token (HTTP 401): check --token / "
                "SANDBOXD_TOKEN"
            )
        if status == 403:
            return CliError(f"the daemon at {self.url} refused {what} (HTTP 403): {message}")
        if status == 404 and what.startswith("/"):
            return CliError(f"{self.url} does not serve {what} (HTTP 404): is it sandboxd?")
        if status == 404:
            return CliError(f"{what}: not found in the sandbox")
        suffix = f": {message}" if message else ""
        return CliError(f"the daemon at {self.url} refused {what} (HTTP {status}){suffix}")

    def unreachable(self, reason: str) -> CliError:
        return CliError(
            f"cannot reach the daemon at {self.url} ({reason}); is it running? "
            "(set --url / SANDBOXD_URL)"
        )

    def websocket(self, path: str) -> WebSocket:
        """A WebSocket to ``path``; raises ``CliError`` for a refusal or no connection."""
        try:
            return WebSocket.connect(self.target, path, self.headers, self.connect_timeout)
        except Unreachable as exc:
            raise self.unreachable(str(exc)) from None
        except Rejected as exc:
            raise self.refused(exc.status, exc.body, path) from None


def error_message(frame: dict[str, Any], command_id: str) -> CliError:
    """The ``CliError`` for a daemon ``error`` frame (other than a timeout)."""
    kind, text = frame.get("error_type", "CommandError"), frame.get("error", "")
    if kind == "CommandNotFound":
        return CliError(f"no command with id {command_id} (never started, or expired)")
    if kind == "SessionExpired":
        return CliError(f"the session of {command_id} has expired (its TTL ran out)")
    return CliError(f"{kind}: {text}")


class Offsets:
    """The next byte wanted from each stream: what was delivered so far."""

    def __init__(self, stdout: int = 0, stderr: int = 0) -> None:
        self.stdout = stdout
        self.stderr = stderr

    def hint(self, command_id: str) -> str:
        """How to resume exactly from here."""
        return f"sandboxd attach --offsets {self.stdout}:{self.stderr} {command_id}"


class CommandStream:
    """One command's ``/execute/ws`` stream, reattached at the delivered offsets after a
    connection drop, with backoff, for at most ``reconnect_seconds`` of trying.

    ``execute`` is the frame that starts the command; it is re-sent (same ``command_id``,
    so never a second spawn) if the connection drops before ``started``. Without it the
    stream attaches with ``reconnect`` (``watch`` for a read-only attachment).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        command_id: str,
        execute: dict[str, Any] | None = None,
        offsets: Offsets | None = None,
        watch: bool = False,
        reconnect_seconds: float = RECONNECT_SECONDS,
    ) -> None:
        self.endpoint = endpoint
        self.command_id = command_id
        self.execute = execute
        self.offsets = offsets or Offsets()
        self.watch = watch
        self.reconnect_seconds = reconnect_seconds
        self.ws: WebSocket | None = None
        self.started: dict[str, Any] | None = None

    def open(self) -> WebSocket:
        """Connect and send the binding frame (``execute`` or ``reconnect``)."""
        ws = self.endpoint.websocket("/execute/ws")
        if self.execute is not None and self.started is None:
            frame = self.execute
        else:
            frame = {
                "type": "reconnect",
                "command_id": self.command_id,
                "stdout_offset": self.offsets.stdout,
                "stderr_offset": self.offsets.stderr,
            }
            if self.watch:
                frame["watch"] = True
        with contextlib.suppress(Closed):  # a failure shows at the next receive
            ws.send_text(json.dumps(frame))
        self.ws = ws
        return ws

    def send(self, **frame: Any) -> None:
        """Send a control frame; dropped (not queued) while disconnected, like the SDKs."""
        if self.ws is None or self.ws.closed:
            return
        with contextlib.suppress(Closed):
            self.ws.send_text(json.dumps(frame))

    def reopen(self, wait: Callable[[float], bool] | None = None) -> None:
        """Reattach after a drop, with backoff; ``wait(seconds)`` False means give up now.

        Raises ``CliError`` with the resume hint once ``reconnect_seconds`` have passed.
        """
        wait = wait or _sleep
        budget = float(os.environ.get("SANDBOXD_RECONNECT_SECONDS", self.reconnect_seconds))
        deadline = time.monotonic() + budget
        delay = FIRST_BACKOFF
        last = "connection lost"
        while True:
            try:
                self.open()
                return
            except CliError as exc:
                last = exc.message
            if time.monotonic() + delay > deadline or not wait(delay):
                raise CliError(
                    f"lost the connection to {self.command_id} ({last}); the command may "
                    f"still be running. Resume: {self.offsets.hint(self.command_id)}"
                )
            delay = min(delay * 2, MAX_BACKOFF)

    def frames(self, messages: list[str | bytes]) -> list[dict[str, Any]]:
        """Decode ``messages`` and move the offsets past all of them. Each output chunk
        comes with ``bytes``, only those not yet delivered, and ``end``, its stream's
        offset after it (``offsets`` is already past the whole batch)."""
        out: list[dict[str, Any]] = []
        for message in messages:
            try:
                frame = json.loads(message)
            except ValueError:
                continue
            if not isinstance(frame, dict):
                continue
            kind = frame.get("type")
            if kind == "started":
                self.started = frame
            elif kind in ("stdout", "stderr"):
                data = str(frame.get("data", "")).encode()
                offset = int(frame.get("offset", 0))
                cursor = getattr(self.offsets, kind)
                if offset + len(data) <= cursor:
                    continue  # already delivered
                if offset < cursor:
                    data = data[cursor - offset :]
                frame["bytes"] = data
                frame["end"] = offset + len(frame["bytes"])
                setattr(self.offsets, kind, frame["end"])
            elif kind == "gap":
                stream = frame.get("stream")
                if stream in ("stdout", "stderr"):
                    end = int(frame.get("to", 0))
                    setattr(self.offsets, stream, max(getattr(self.offsets, stream), end))
            out.append(frame)
        return out

    def iterate(self) -> Iterator[dict[str, Any]]:
        """Every frame until the terminal one (``exit`` or ``error``), reattaching after
        drops; raises ``CliError`` for an error frame other than a timeout."""
        ws = self.ws or self.open()
        while True:
            try:
                messages = ws.buffered() or ws.receive()
            except Closed:
                self.reopen()
                assert self.ws is not None
                ws = self.ws
                continue
            for frame in self.frames(messages):
                if frame.get("type") == "error" and frame.get("error_type") != "CommandTimeout":
                    raise error_message(frame, self.command_id)
                yield frame
                if frame.get("type") in ("exit", "error"):
                    return
