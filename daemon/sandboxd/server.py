"""The raw ASGI application served by hypercorn's trio worker.

Routing, the HTTP error body of protocol.md §1.3, and the small HTTP endpoints of the
daemon itself (``/healthz``, ``/sessions``). ``/execute/ws`` lives in ``exec_ws.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from sandboxd import __version__
from sandboxd.errors import SandboxdError, ServerShuttingDown
from sandboxd.exec_ws import ExecConnection
from sandboxd.supervisor import Supervisor

log = logging.getLogger("sandboxd.server")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_SLASHES = re.compile(r"/{2,}")
_encoder = msgspec.json.Encoder()


def error_body(error_type: str, message: str) -> bytes:
    """The JSON body of every HTTP error: ``{"detail": {"error", "message"}}``."""
    return _encoder.encode({"detail": {"error": error_type, "message": message}})


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class App:
    """sandboxd's ASGI application."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.connections: set[ExecConnection] = set()
        self._no_connections = trio.Event()
        self._no_connections.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        path = _SLASHES.sub("/", scope["path"])
        if kind == "websocket":
            await self._websocket(path, scope, receive, send)
        elif kind == "http":
            await self._http(path, scope, send)

    # ---- WebSocket ----------------------------------------------------------------

    async def _websocket(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        if path != "/execute/ws":
            await self._reject(send, 404, "NotFound", f"no WebSocket endpoint at {path}")
            return
        if self.supervisor.shutting_down:
            await self._reject(
                send, 503, ServerShuttingDown.error_type, "sandboxd is shutting down", retry=1
            )
            return
        await send({"type": "websocket.accept"})
        connection = ExecConnection(self.supervisor, receive, send, _peer(scope))
        self.connections.add(connection)
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        try:
            await connection.run()
        except Exception:
            log.exception("exec connection failed", extra={"peer": _peer(scope)})
        finally:
            self.connections.discard(connection)
            if not self.connections:
                self._no_connections.set()

    async def wait_no_connections(self) -> None:
        """Return once no exec socket is open."""
        await self._no_connections.wait()

    async def _reject(
        self, send: Send, status: int, error_type: str, message: str, retry: int | None = None
    ) -> None:
        body = error_body(error_type, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if retry is not None:
            headers.append((b"retry-after", b"%d" % retry))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})

    async def going_away(self, within: float = 1.0) -> None:
        """Close every exec socket for a shutdown (1001 after ``started``).

        A socket whose client stopped reading can hold its send forever (hypercorn
        shields socket writes), so this gives up after ``within`` seconds.
        """
        with trio.move_on_after(within):
            async with trio.open_nursery() as nursery:
                for connection in list(self.connections):
                    nursery.start_soon(connection.going_away)

    # ---- HTTP ---------------------------------------------------------------------

    async def _http(self, path: str, scope: Scope, send: Send) -> None:
        method = scope["method"]
        try:
            if path == "/healthz" and method in ("GET", "HEAD"):
                await self._json(send, 200, self._health(), head=method == "HEAD")
            elif path == "/sessions" and method == "GET":
                await self._json(send, 200, {"sessions": self.supervisor.snapshot()})
            elif path in ("/healthz", "/sessions"):
                await self._error(send, 405, "MethodNotAllowed", f"{method} is not allowed here")
            else:
                await self._error(send, 404, "NotFound", f"no endpoint at {path}")
        except SandboxdError as exc:
            await self._error(send, exc.http_status, exc.error_type, exc.message)

    def _health(self) -> dict[str, object]:
        supervisor = self.supervisor
        return {
            "status": "stopping" if supervisor.shutting_down else "ok",
            "version": __version__,
            "sessions": len(supervisor.sessions),
            "buffered_bytes": supervisor.pool.total,
            "orphans_reaped": supervisor.reaper.orphans_reaped,
        }

    async def _json(self, send: Send, status: int, payload: object, head: bool = False) -> None:
        body = _encoder.encode(payload)
        await _respond(send, status, body, b"" if head else body)

    async def _error(self, send: Send, status: int, error_type: str, message: str) -> None:
        body = error_body(error_type, message)
        await _respond(send, status, body, body)

    # ---- lifespan -----------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
            else:  # pragma: no cover - not sent by hypercorn
                await trio.lowlevel.checkpoint()


async def _respond(send: Send, status: int, body: bytes, sent_body: bytes) -> None:
    """A complete JSON response; ``sent_body`` differs from ``body`` only for HEAD."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": sent_body})
