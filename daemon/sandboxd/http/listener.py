"""Accepting connections, and routing each to the lean WebSocket path or to hypercorn.

The first request head of a connection is read here (within the handshake timeout). A
valid WebSocket upgrade to ``/execute/ws`` or ``/tunnel`` goes to ``websocket.py``, which
speaks the protocol on the raw stream; everything else (other requests, heads that do not
parse, heads over ``MAX_HEAD_BYTES``, and permessage-deflate offers when
``--ws-compression`` accepts them) goes to hypercorn with the bytes read so far.

hypercorn's own ``worker_serve`` runs every connection in one nursery, so an exception
escaping one connection's protocol handling (seen: h11 ``LocalProtocolError`` when a
client sends WebSocket data before the upgrade is answered) ends the whole server. Here
each connection runs ``hypercorn.trio.tcp_server.TCPServer`` inside its own guard: a
failure is logged and closes that connection only.

At most ``max_connections`` are served at once. One more is told so in a plain 503 with
the usual ``detail`` body and closed, before any of it is read, so a flood of idle
connections cannot use up the daemon's file descriptors.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable

import h11
import trio
import wsproto.utilities
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from sandboxd.core import websocket as ws
from sandboxd.http.asgi import error_body
from sandboxd.http.websocket import UpgradeTarget, serve_upgrade

log = logging.getLogger("sandboxd.http")

#: How long a refused connection may take to receive its 503.
REFUSAL_SECONDS = 1.0


class _TCPServer(TCPServer):
    """hypercorn's connection, minus a wait: once the client's side has ended, the idle
    timer is stopped instead of left to run out (the connection would otherwise hold
    its task, and its place under ``max_connections``, for the whole timeout)."""

    #: What the listener read of the connection before handing it over.
    prefix = b""
    _first_idle = True

    async def _idle_timeout(self) -> None:
        # hypercorn closes a connection at once when told to close (a live upgrade
        # draining: ``AcceptControl.pause``), even a new one whose first request the
        # listener has already read. That request is served first: the connection's
        # first idle timer runs its whole length whatever the context says, and
        # hypercorn closes the connection after the answer.
        if not self._first_idle:
            await super()._idle_timeout()
            return
        self._first_idle = False
        await trio.sleep(self.config.keep_alive_timeout)
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def _read_data(self) -> None:
        if self.prefix:
            await self.protocol.handle(RawData(self.prefix))
        await super()._read_data()
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        # hypercorn serialises its sends with a lock, but its ``_close`` calls
        # ``send_eof`` outside that lock, and trio's ``send_eof`` holds the stream's
        # send guard across a checkpoint. A send in that window (seen: the pong that
        # answers a client's ping while the server closes the socket) raises
        # BusyResourceError. It can only happen once the connection is closing, so the
        # bytes are moot: treat it as the closed connection it is.
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())


def client_broke_protocol(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception in its group) is h11 or wsproto giving up on
    what the client sent: WebSocket data before the 101, or after the connection's close
    (RFC 6455 forbids both; hypercorn lets the parser's error escape)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(client_broke_protocol(e) for e in exc.exceptions)
    return isinstance(exc, h11.ProtocolError | wsproto.utilities.ProtocolError)


def _refusal(max_connections: int, body: bytes | None = None) -> bytes:
    body = body or error_body(
        "TooManyConnections", f"sandboxd serves at most {max_connections} connections at once"
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve_http(
    app: object,
    config: HypercornConfig,
    sock: socket.socket,
    stop: trio.Event,
    *,
    max_connections: int = 1024,
    lean: LeanOptions | None = None,
    control: AcceptControl | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the listening ``sock`` until ``stop`` is set.

    Then stop accepting, let open connections finish for ``config.graceful_timeout``
    seconds, and cancel what is left. The accept loop only ever owns a dup of ``sock``
    (it closes its listener when it stops), so ``sock`` itself keeps listening and new
    connections queue in its backlog while ``control`` pauses accepting (a live upgrade
    carries ``sock`` to the next image).
    """
    context = WorkerContext(None)
    control = control or AcceptControl()
    context.terminated = control.hypercorn_closing
    wrapped = ASGIWrapper(app)  # type: ignore[arg-type]

    open_connections = 0
    last_warning = -math.inf
    refusal = _refusal(max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await serve_connection(stream)
        finally:
            stream.socket.close()  # (if its server has not: no checkpoint)
            control.connection_ended()

    async def serve_connection(stream: trio.SocketStream) -> None:
        nonlocal open_connections, last_warning
        if open_connections >= max_connections:
            if trio.current_time() - last_warning >= 1.0:  # one line a second in a flood
                last_warning = trio.current_time()
                log.warning("connections refused: too many open", extra={"max": max_connections})
            await _refuse(stream, refusal)
            return
        open_connections += 1
        try:
            control.head_reading(1)
            try:
                prefix = await _read_head(stream, config.keep_alive_timeout)
            finally:
                control.head_reading(-1)
            if prefix is None:
                await trio.aclose_forcefully(stream)
                return
            if lean is not None:
                upgrade = lean.route(prefix)
                if upgrade is not None:
                    head, key, end = upgrade
                    await serve_upgrade(
                        stream, head, key, prefix[end:], lean.target, lean.max_message
                    )
                    return
            server = _TCPServer(wrapped, config, context, ConnectionState({}), stream)  # type: ignore[arg-type]
            server.prefix = prefix
            await server
        except Exception as exc:
            if client_broke_protocol(exc):
                log.info("client broke the protocol; closed", extra={"error": repr(exc)})
            else:
                log.exception("connection failed; closed it")
            await trio.aclose_forcefully(stream)
        finally:
            open_connections -= 1

    async with trio.open_nursery() as connections:
        started = False
        while not stop.is_set():
            async with trio.open_nursery() as accepting:
                if control.state is AcceptState.SERVING:
                    accepting.start_soon(_accept, sock.dup(), control, connections, handle)
                if not started:
                    task_status.started()
                    started = True
                await control.wait_changed_or(stop)
                accepting.cancel_scope.cancel()
        sock.close()  # (stopping: the port is released, as before the accept loop dup'd)
        control.hypercorn_closing.set_now()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout


class AcceptState(enum.Enum):
    """Where a live upgrade has taken the listener."""

    SERVING = "serving"
    #: Not accepting (new connections wait in the backlog for the next image); hypercorn
    #: closes idle keep-alive connections, and each busy one after its response.
    DRAINING = "draining"


class _SyncEvent:
    """hypercorn's ``Event`` protocol, also settable from synchronous code (an upgrade
    refused under cancellation must still reopen the HTTP side)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    async def set(self) -> None:
        self.set_now()

    async def clear(self) -> None:
        self.clear_now()

    async def wait(self) -> None:
        await self._event.wait()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set_now(self) -> None:
        self._event.set()

    def clear_now(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()


#: accept() errors that are the connection's, not the listener's: try the next one.
_ACCEPT_SKIP_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT}
    | {errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}
)
#: accept() errors that mean "out of fds or memory": wait a little and try again.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Connections accepted in a row before the accept loop yields once.
_ACCEPT_STREAK = 16


async def _accept(
    sock: socket.socket,
    control: AcceptControl,
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    """Accept on ``sock`` (a dup of the listening socket, closed here) until cancelled,
    and serve each connection with ``handler`` in ``nursery``.

    Each connection is counted (``control.connection_accepted``) the moment it is
    accepted, before its handler task has run, so that an upgrade waiting for "no
    connection left" cannot miss one. (trio's ``serve_listeners`` would also take a
    checkpoint per accept and a cancel scope and a checkpoint per connection closed.)
    """
    sock.setblocking(False)
    streak = 0
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                streak = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_SKIP_ERRNOS:
                    continue
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("cannot accept a connection: waiting", extra={"error": str(exc)})
                await trio.sleep(0.1)
                continue
            control.connection_accepted()  # (no checkpoint since the accept)
            nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
            streak += 1
            if streak >= _ACCEPT_STREAK:
                streak = 0
                await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


class AcceptControl:
    """Takes the listener through a live upgrade (``AcceptState``), and counts the
    connections it has accepted whose handler has not ended."""

    def __init__(self) -> None:
        self.state = AcceptState.SERVING
        self.connections = 0
        self.reading_heads = 0  # connections whose first request head is being read
        #: Tells hypercorn to close its connections (its ``WorkerContext.terminated``).
        self.hypercorn_closing = _SyncEvent()
        self._changed = trio.Event()
        self._connections_ended = trio.Event()
        self._heads_read = trio.Event()

    def connection_accepted(self) -> None:
        """One more accepted connection."""
        self.connections += 1

    def connection_ended(self) -> None:
        """The handler of an accepted connection has ended (the connection is closed)."""
        self.connections -= 1
        self._connections_ended.set()
        self._connections_ended = trio.Event()

    def head_reading(self, change: int) -> None:
        """One more (1) or one fewer (-1) connection whose head is being read."""
        self.reading_heads += change
        if not self.reading_heads:
            self._heads_read.set()
            self._heads_read = trio.Event()

    async def wait_heads_read(self) -> None:
        """Return once no connection's first request head is still being read."""
        while self.reading_heads:
            await self._heads_read.wait()

    def pause(self) -> None:
        """Stop accepting (new connections wait in the listening socket's backlog) and
        have hypercorn close its keep-alive connections: idle ones at once, busy ones
        once their response is out. A request already on its way is still served."""
        self.state = AcceptState.DRAINING
        self.hypercorn_closing.set_now()
        self._poke()

    def resume(self) -> None:
        """Serve again (the upgrade was refused)."""
        self.state = AcceptState.SERVING
        self.hypercorn_closing.clear_now()
        self._poke()

    async def wait_connections_ended(self) -> None:
        """Return once every accepted connection's handler has ended."""
        while self.connections:
            await self._connections_ended.wait()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed_or(self, stop: trio.Event) -> None:
        """Return on the next pause/resume, or once ``stop`` is set."""
        changed = self._changed
        async with trio.open_nursery() as nursery:

            async def wait(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, changed)
            nursery.start_soon(wait, stop)


class LeanOptions:
    """Where the lean path sends upgrades, and its settings."""

    def __init__(self, target: UpgradeTarget, max_message: int, compression: bool) -> None:
        self.target = target
        self.max_message = max_message
        self.compression = compression

    def route(self, prefix: bytes) -> tuple[ws.RequestHead, str, int] | None:
        """The head, key and head length of a lean upgrade at the start of ``prefix``."""
        end = ws.head_end(prefix)
        if end < 0:
            return None
        head = ws.parse_head(prefix[:end])
        if head is None or head.path not in LEAN_PATHS:
            return None
        key = ws.upgrade_key(head)
        if key is None or (self.compression and ws.offers_deflate(head)):
            return None
        return head, key, end


#: The upgrades the lean path serves.
LEAN_PATHS = frozenset({"/execute/ws", "/tunnel"})


async def _read_head(stream: trio.SocketStream, seconds: float) -> bytes | None:
    """What the client sent, up to the end of its first request head when that is a
    GET (only a GET can be an upgrade) and at most ``MAX_HEAD_BYTES``. None when the
    client sent nothing, or no whole head within ``seconds``."""
    # On loopback the request is usually there by the time the handler runs: one read,
    # with no cancel scope and no checkpoint.
    try:
        data = os.read(stream.socket.fileno(), ws.MAX_HEAD_BYTES)
    except BlockingIOError:
        data = b""
    except OSError:
        return None
    else:
        if not data:
            return None
        if _head_complete(data):
            return data
    with trio.move_on_after(seconds):
        while True:
            try:
                chunk = await stream.receive_some(ws.MAX_HEAD_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                return data or None
            data += chunk
            if _head_complete(data):
                return data
    return None


def _head_complete(data: bytes) -> bool:
    """Whether ``data`` is all ``_read_head`` reads: the end of a GET's head, anything
    that cannot be a GET, or ``MAX_HEAD_BYTES``."""
    return (
        not b"GET ".startswith(data[:4]) or ws.head_end(data) >= 0 or len(data) >= ws.MAX_HEAD_BYTES
    )


async def _refuse(stream: trio.SocketStream, refusal: bytes) -> None:
    with trio.move_on_after(REFUSAL_SECONDS):
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(refusal)
    await trio.aclose_forcefully(stream)
