"""The raw ASGI application served on hypercorn's trio protocol stack.

Routing (duplicate slashes collapse, so a dataplane URL ending in ``/`` works), the
error body of protocol.md §1.3 for every failure, and the daemon's own endpoints
(``/healthz``, ``/sessions``). The endpoints themselves live in ``exec_ws.py``,
``files.py``, ``search.py``, ``sse.py``, ``tunnel.py`` and ``terminal.py`` (the browser
terminal's page at ``/``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable

import h11
import trio

from sandboxd import __version__
from sandboxd.core.config import Config
from sandboxd.core.errors import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    SandboxdError,
    ServerShuttingDown,
)
from sandboxd.endpoints import files, search
from sandboxd.endpoints.exec_ws import ExecConnection
from sandboxd.endpoints.sse import SseEndpoints
from sandboxd.endpoints.terminal import Asset, TerminalFiles
from sandboxd.endpoints.transport import AsgiTransport, MessageTransport
from sandboxd.endpoints.tunnel import PortPolicy, serve_tunnel
from sandboxd.http.asgi import (
    ClientGone,
    Handler,
    Receive,
    Scope,
    Send,
    error_body,
    header,
    read_json,
    respond,
    respond_error,
    respond_json,
)
from sandboxd.http.auth import SUBPROTOCOL, Gate, Verdict
from sandboxd.runtime import reexec
from sandboxd.runtime.supervisor import Supervisor
from sandboxd.runtime.upgrade import Upgrader, UpgradeRefused, UpgradeStatus

log = logging.getLogger("sandboxd.server")

_SLASHES = re.compile(r"/{2,}")

#: WebSocket endpoints.
WEBSOCKET_PATHS = ("/execute/ws", "/tunnel")
#: Requests a live upgrade neither waits for nor refuses while it drains.
_NOT_DRAINED = frozenset({"/healthz", "/admin/upgrade"})
#: Largest candidate artifact ``POST /admin/upgrade`` accepts.
ARTIFACT_MAX_BYTES = 512 * 1024 * 1024


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class App:
    """sandboxd's ASGI application."""

    def __init__(self, supervisor: Supervisor, config: Config, own_port: int) -> None:
        self.supervisor = supervisor
        self.config = config
        # Relative file paths always resolve from the configured home, even before it
        # exists: an upload then creates it, a read answers 404.
        self.home = config.home
        self.tunnel_policy = PortPolicy(config.tunnel_ports, own_port)
        self.gate = Gate(config.token, config.allowed_origins)
        self.connections: set[ExecConnection] = set()
        self._no_connections = trio.Event()
        self._no_connections.set()
        self.upgrade_status = UpgradeStatus()
        self.upgrader: Upgrader | None = None
        self.background: trio.Nursery | None = None  # where a committed upgrade runs
        self._uploading = False  # a candidate's body is being received
        self._closing_for_upgrade = False  # a committed upgrade is closing every client
        self.tunnels: set[tuple[trio.CancelScope, MessageTransport]] = set()
        self.in_flight = 0  # HTTP requests being served (but those of _NOT_DRAINED/SSE)
        self.requests = 0  # every HTTP request being served
        self._flight_changed = trio.Event()
        self.sse = sse = SseEndpoints(supervisor, config.sse_ack_bytes)
        self.http_routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz, "HEAD": self._healthz},
            "/sessions": {"GET": self._sessions},
            "/upload": {"POST": self._upload},
            "/download": {"GET": self._download, "HEAD": self._download},
            "/glob": {"POST": self._glob},
            "/grep": {"POST": self._grep},
            "/execute/stream/start": {"POST": sse.start},
            "/execute/stream/resume": {"POST": sse.resume},
            "/execute": {"POST": sse.execute},
            "/admin/upgrade": {"POST": self._admin_upgrade},
        }
        self.terminal = TerminalFiles()
        for asset_path, asset in self.terminal.assets.items():
            serve = self._static(asset)
            self.http_routes[asset_path] = {"GET": serve, "HEAD": serve}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        path = _SLASHES.sub("/", scope["path"])
        if kind == "websocket":
            await self._asgi_websocket(path, scope, receive, send)
        elif kind == "http":
            verdict = self.gate.check(
                path,
                lambda name: header(scope, name),
                scope["client"][0] if scope.get("client") else "?",
                trio.current_time(),
                upgrade=False,
                tls=scope.get("scheme") == "https",
            )
            if not verdict.allowed:
                await self._refuse(verdict, send)
                return
            await self._http(path, scope, receive, send)

    # ---- WebSocket ----------------------------------------------------------------

    def upgrade_refusal(
        self, path: str, header: Callable[[str], str | None], peer: str, *, tls: bool
    ) -> Verdict | None:
        """Why an upgrade to ``path`` is refused (token, Origin, no such endpoint, a stop
        under way), or None to accept it. ``peer`` is the client's host; ``tls`` whether
        the upgrade came over wss (the scheme of the daemon's own origin)."""
        verdict = self.gate.check(path, header, peer, trio.current_time(), upgrade=True, tls=tls)
        if not verdict.allowed:
            log.info(
                "request refused",
                extra={"error_type": verdict.error_type, "status": verdict.status},
            )
            return verdict
        if path not in WEBSOCKET_PATHS:
            return Verdict(False, 404, "NotFound", f"no WebSocket endpoint at {path}")
        if self.supervisor.shutting_down or self.supervisor.upgrading:
            what = "upgrading" if self.supervisor.upgrading else "shutting down"
            error_type = ServerShuttingDown.error_type
            return Verdict(False, 503, error_type, f"sandboxd is {what}", 1)
        return None

    async def serve_websocket(self, path: str, transport: MessageTransport, peer: str) -> None:
        """Run the endpoint at ``path`` on an accepted WebSocket until it is done."""
        if path == "/tunnel":
            if self._closing_for_upgrade:  # (accepted after the upgrade closed the others)
                await _close_tunnel(trio.CancelScope(), transport)
                return
            with trio.CancelScope() as scope:
                entry = (scope, transport)
                self.tunnels.add(entry)
                try:
                    await serve_tunnel(transport, self.tunnel_policy)
                except Exception:
                    log.exception("tunnel failed", extra={"peer": peer})
                finally:
                    self.tunnels.discard(entry)
            return
        connection = ExecConnection(self.supervisor, transport, peer)
        self.connections.add(connection)
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        try:
            if self._closing_for_upgrade:  # (accepted after the upgrade closed the others)
                await connection.going_away()
            else:
                await connection.run()
        except Exception:
            log.exception("exec connection failed", extra={"peer": peer})
        finally:
            self.connections.discard(connection)
            if not self.connections:
                self._no_connections.set()

    async def _asgi_websocket(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        """An upgrade hypercorn serves (see ``endpoints/transport.py`` for which)."""
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        client = scope["client"][0] if scope.get("client") else "?"
        verdict = self.upgrade_refusal(
            path, lambda name: header(scope, name), client, tls=scope.get("scheme") == "wss"
        )
        if verdict is not None:
            await self._reject(
                send, verdict.status, verdict.error_type, verdict.message, verdict.retry_after
            )
            return
        # A browser offers the token as a subprotocol next to ``sandboxd.v1`` and fails
        # the connection unless one it offered comes back; the SDKs offer none.
        accept: dict[str, object] = {"type": "websocket.accept"}
        if SUBPROTOCOL in scope.get("subprotocols", ()):
            accept["subprotocol"] = SUBPROTOCOL
        try:
            await send(accept)
        except h11.LocalProtocolError as exc:
            # The client sent more after its upgrade request before the 101 (RFC 6455
            # forbids it); hypercorn's HTTP layer has given up on the connection.
            log.info("upgrade abandoned", extra={"peer": _peer(scope), "error": str(exc)})
            return
        await self.serve_websocket(path, AsgiTransport(receive, send), _peer(scope))

    async def _refuse(self, verdict: Verdict, send: Send) -> None:
        log.info(
            "request refused",
            extra={"error_type": verdict.error_type, "status": verdict.status},
        )
        retry = [("retry-after", str(verdict.retry_after))] if verdict.retry_after else []
        await respond(
            send, verdict.status, error_body(verdict.error_type, verdict.message), headers=retry
        )

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

    # ---- live upgrade -------------------------------------------------------------

    async def wait_drained(self, seconds: float) -> bool:
        """Wait for in-flight HTTP requests to finish (False: not within ``seconds``)."""
        with trio.move_on_after(seconds):
            while self.in_flight:
                await self._flight_changed.wait()
            return True
        return False

    async def close_for_upgrade(self) -> None:
        """Close every client for a live upgrade: exec sockets 1001 after ``started``
        (1000 before it: both SDKs re-send the execute), SSE responses end with
        ``ack_required``, tunnels 1001; HTTP requests that come in from now on are
        answered 503. Returns once no HTTP request is being served (the caller bounds
        the wait: a client that stopped reading can hold a send forever)."""
        self._closing_for_upgrade = True
        async with trio.open_nursery() as nursery:
            for connection in list(self.connections):
                nursery.start_soon(connection.going_away)
            for scope, transport in list(self.tunnels):
                nursery.start_soon(_close_tunnel, scope, transport)
            nursery.start_soon(self.sse.end_for_upgrade)
        while self.requests:
            await self._flight_changed.wait()

    def reopen_after_upgrade(self) -> None:
        """Undo ``close_for_upgrade`` (the upgrade was refused at the swap)."""
        self._closing_for_upgrade = False

    async def _admin_upgrade(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /admin/upgrade``: 202 once the candidate passed the pre-flight check and
        the swap is committed, 409 when refused (the body may carry the candidate)."""
        try:
            if self.upgrader is None or self.background is None:
                raise UpgradeRefused("live upgrades are not available in this daemon")
            # Refused before a byte of the body is written: a second upload must never
            # replace a candidate that is being (or was) checked.
            self.upgrader.check_can_start()
            if self._uploading:
                raise UpgradeRefused("another upgrade is under way")
            self._uploading = True
            try:
                candidate = await self._receive_artifact(scope, receive)
                argv = await self.upgrader.prepare(candidate)
            finally:
                self._uploading = False
        except UpgradeRefused as exc:
            detail = {"error": exc.error_type, "message": exc.message}
            await respond_json(send, 409, {**detail, "detail": detail})
            return
        status = self.upgrade_status
        try:
            await respond_json(
                send, 202, {"generation": status.generation + 1, "from_version": __version__}
            )
        finally:
            # (after the answer, whose connection the commit closes; and even if the
            # answer failed: a prepared upgrade always goes on, it never hangs half-done)
            self.background.start_soon(self.upgrader.commit, argv)

    async def _receive_artifact(self, scope: Scope, receive: Receive) -> list[str] | None:
        """Write a non-empty body (``Content-Type: application/octet-stream``, which a
        browser cannot send cross-site without a CORS pre-flight) to ``sandboxd.next``
        beside the running executable; the candidate's argv (None: no body)."""
        assert self.upgrader is not None
        path = reexec.next_path(os.environ)
        content_type = (header(scope, "content-type") or "").split(";")[0].strip().lower()
        temp = ""
        fd = -1
        size = 0
        try:
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = memoryview(event.get("body", b""))
                if chunk:
                    size += len(chunk)
                    if size > ARTIFACT_MAX_BYTES:
                        raise PayloadTooLarge(f"artifact over {ARTIFACT_MAX_BYTES} bytes")
                    if fd < 0:
                        if content_type != "application/octet-stream":
                            raise UpgradeRefused(
                                "a candidate is sent as Content-Type: application/octet-stream"
                            )
                        # a fresh name of its own (O_EXCL: never a planted file or link)
                        directory, name = os.path.split(path)
                        fd, temp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
                    while chunk:
                        chunk = chunk[os.write(fd, chunk) :]
                if not event.get("more_body", False):
                    break
            if fd < 0:
                return None
            os.fchmod(fd, 0o755)
            os.close(fd)
            fd = -1
            os.replace(temp, path)
            temp = ""
        except OSError as exc:
            raise UpgradeRefused(f"cannot write the candidate to {path}: {exc.strerror}") from None
        finally:
            if fd >= 0:
                os.close(fd)
            if temp:  # not renamed (a refusal) leaves nothing; renamed, it is gone already
                with contextlib.suppress(OSError):
                    os.unlink(temp)
        return [path, *self.upgrader.daemon_args]

    # ---- HTTP ---------------------------------------------------------------------

    async def _http(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        try:
            methods = self.http_routes.get(path)
            if methods is None:
                raise NotFound(f"no endpoint at {path}")
            handler = methods.get(method)
            if handler is None:
                raise MethodNotAllowed(f"{method} {path} is not allowed; use {', '.join(methods)}")
            if self.supervisor.shutting_down and path.startswith("/execute"):
                raise ServerShuttingDown("sandboxd is shutting down")
            # (While an upgrade drains, a request is still served: its connection is
            # closed after the answer. Once the upgrade closes the clients, it is not.)
            if self._closing_for_upgrade and path not in _NOT_DRAINED:
                raise ServerShuttingDown("sandboxd is upgrading")
            counted = path not in _NOT_DRAINED and not path.startswith("/execute/stream/")
            self.in_flight += counted
            self.requests += 1
            try:
                await handler(scope, receive, send)
            finally:
                self.in_flight -= counted
                self.requests -= 1
                self._flight_changed.set()
                self._flight_changed = trio.Event()
        except SandboxdError as exc:
            log.info(
                "request refused",
                extra={"path": path, "error_type": exc.error_type, "error": exc.message},
            )
            retry = [("retry-after", "1")] if exc.http_status == 503 else []
            await respond_error(send, exc, retry)
        except ClientGone:
            log.info("client left mid-request", extra={"path": path, "peer": _peer(scope)})

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        supervisor = self.supervisor
        payload = {
            "status": "stopping" if supervisor.shutting_down else "ok",
            "version": __version__,
            "sessions": len(supervisor.sessions),
            "buffered_bytes": supervisor.pool.total,
            "orphans_reaped": supervisor.reaper.orphans_reaped,
            **self.upgrade_status.fields(),
        }
        # 503 while stopping, so a readiness probe takes the sandbox out of rotation.
        status = 503 if supervisor.shutting_down else 200
        await respond_json(send, status, payload, head=scope["method"] == "HEAD")

    def _static(self, asset: Asset) -> Handler:
        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            await self.terminal.serve(asset, scope, receive, send)

        return serve

    async def _sessions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond_json(send, 200, {"sessions": self.supervisor.snapshot()})

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        await files.upload(scope, receive, send, self.home, self.config.upload_max_bytes)

    async def _download(self, scope: Scope, receive: Receive, send: Send) -> None:
        await files.download(scope, send, self.home, head=scope["method"] == "HEAD")

    async def _glob(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read_json(scope, receive, search.GlobRequest)
        result = await search.glob(request, self.config.search_deadline_seconds)
        await respond_json(send, 200, result)

    async def _grep(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read_json(scope, receive, search.GrepRequest)
        result = await search.grep(request, self.config.search_deadline_seconds)
        await respond_json(send, 200, result)

    # ---- lifespan -----------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _close_tunnel(scope: trio.CancelScope, transport: MessageTransport) -> None:
    """A live upgrade: 1001 to the tunnel's client (its TCP streams end with it)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await transport.send([], close=1001)
    scope.cancel()
