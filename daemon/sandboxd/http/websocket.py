"""The lean WebSocket path: sandboxd speaks RFC 6455 itself on the raw trio stream.

``listener.py`` hands a fresh connection here when its first request head is a valid
upgrade to ``/execute/ws`` or ``/tunnel`` (``core/websocket.py`` decides); hypercorn
never sees it (the listener has already applied the connection limit and the handshake
timeout). The token (a header or the ``sandboxd.token.`` subprotocol) and the Origin
(allowlist or same origin) are checked as on hypercorn's path, and a refusal answered,
before the 101, which echoes ``sandboxd.v1`` when the client offered it.

``WebSocket`` is the endpoints' ``MessageTransport``: whole messages in (pings answered,
pongs handed to the endpoint's ``on_pong`` handler, fragments joined, limits enforced by
the parser: 1009, 1002, 1007), batches of messages out in one write each (header and
payload of every frame, and a ping or a close frame behind the last, handed to one
``writev``; ``rawio.py`` yields to the loop only when the kernel makes it wait). Sends are
not shielded: a client that stopped reading holds a write only until its connection is
cancelled.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from sandboxd.core import websocket as ws
from sandboxd.endpoints.transport import MessageTransport
from sandboxd.http.asgi import error_body
from sandboxd.http.auth import SUBPROTOCOL, Verdict
from sandboxd.http.rawio import RawSocket

log = logging.getLogger("sandboxd.http")

#: How long, after its close frame, the daemon waits for the client's before it drops
#: the connection.
CLOSE_TIMEOUT = 2.0
RECEIVE_BYTES = 256 * 1024


class UpgradeTarget(Protocol):
    """What the lean path needs of the application (``App``)."""

    def upgrade_refusal(
        self, path: str, header: Callable[[str], str | None], peer: str, *, tls: bool
    ) -> Verdict | None:
        """Why an upgrade to ``path`` is refused, or None to accept it."""
        ...

    async def serve_websocket(self, path: str, transport: MessageTransport, peer: str) -> None:
        """Run the endpoint at ``path`` on an accepted WebSocket."""
        ...


class WebSocket:
    """An accepted server WebSocket on ``stream``; ``leftover`` is what the client sent
    after its request head (a client may send frames before it has the 101)."""

    def __init__(self, stream: trio.SocketStream, max_message: int, leftover: bytes) -> None:
        self._stream = stream
        self._io = RawSocket(stream.socket)
        self._parser = ws.FrameParser(max_message)
        self._events: deque[ws.Event] = deque()
        self._leftover = leftover
        self._send_lock = trio.Lock()
        self._pong: bytes | None = None
        self._pong_handler: Callable[[bytes], None] | None = None
        self.close_sent = False
        self.ended = False  # the client's side: closed, broke the protocol, or dropped

    # ---- receiving ----------------------------------------------------------------------

    async def receive(self) -> str | bytes | None:
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, ws.Message):
                    return event.data
                if isinstance(event, ws.Ping):
                    await self._answer_ping(event.payload)
                elif isinstance(event, ws.Pong):
                    if self._pong_handler is not None:
                        self._pong_handler(event.payload)
                else:
                    self.ended = True
                    # Echo the client's code (a close without one is answered without one).
                    await self._send_close(event.code)
                    return None
            if self.ended:
                return None
            if self._parser.failed is not None:
                self.ended = True
                failure = self._parser.failed
                log.info("client broke the WebSocket protocol", extra={"error": failure.reason})
                await self._send_close(failure.code, failure.reason)
                return None
            data, self._leftover = self._leftover, b""
            if not data:
                data = await self._io.receive(RECEIVE_BYTES)
                if not data:
                    self.ended = True
                    return None
            self._events.extend(self._parser.feed(data))

    async def _answer_ping(self, payload: bytes) -> None:
        if self.close_sent:
            return  # nothing may follow a close frame
        pong = ws.frame(ws.Opcode.PONG, payload)
        if self._send_lock.locked():
            self._pong = pong  # the write under way sends it next (the latest ping wins)
            return
        try:
            await self._write([pong])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended = True

    # ---- sending ------------------------------------------------------------------------

    def on_pong(self, handler: Callable[[bytes], None]) -> bool:
        self._pong_handler = handler
        return True

    async def send(
        self,
        messages: Sequence[bytes],
        *,
        binary: bool = False,
        close: int | None = None,
        ping: bytes | None = None,
    ) -> None:
        if self.close_sent:
            return
        opcode = ws.Opcode.BINARY if binary else ws.Opcode.TEXT
        parts: list[bytes] = []
        for message in messages:
            parts.append(ws.frame_header(opcode, len(message)))
            parts.append(message)
        if ping is not None:
            parts.append(ws.frame(ws.Opcode.PING, ping))
        if close is not None:
            self.close_sent = True
            parts.append(ws.close_frame(close))
        if parts:
            await self._write(parts)

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as it is (the 101 response, before any frame)."""
        await self._io.send([data])

    async def _send_close(self, code: int | None, reason: str = "") -> None:
        if self.close_sent:
            return
        self.close_sent = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._write([ws.close_frame(code, reason)])

    async def _write(self, parts: list[bytes]) -> None:
        lock = self._send_lock
        if lock.locked():  # (another task's write is under way: rare)
            await lock.acquire()
        else:
            lock.acquire_nowait()  # (no checkpoint: the write takes one if it must wait)
        try:
            await self._io.send(parts)
            while self._pong is not None:
                pong, self._pong = self._pong, None
                await self._io.send([pong])
        finally:
            lock.release()

    # ---- ending -------------------------------------------------------------------------

    async def finish(self) -> None:
        """After the endpoint is done: a close frame if none went out yet, the client's
        close awaited (what it sends before it is dropped), then the socket closed, all
        within ``CLOSE_TIMEOUT``. After a protocol error the rest of what the client
        sends cannot be parsed: the write side is shut and the bytes are drained until
        its EOF, so that closing never resets a connection whose close frame the client
        has not read yet."""
        if self.close_sent and self.ended and self._parser.failed is None:
            self._stream.socket.close()  # (the close handshake is done: nothing to wait for)
            return
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                if not self.close_sent:
                    await self.send([], close=ws.CloseCode.NORMAL)
                while not self.ended:
                    await self.receive()
                if self._parser.failed is not None:
                    await self._stream.send_eof()
                    while await self._stream.receive_some(RECEIVE_BYTES):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._stream.socket.close()  # (what aclose_forcefully does, minus its checkpoint)


async def serve_upgrade(
    stream: trio.SocketStream,
    head: ws.RequestHead,
    key: str,
    leftover: bytes,
    target: UpgradeTarget,
    max_message: int,
) -> None:
    """Answer the upgrade request ``head`` on ``stream``: refuse it (a JSON error
    response), or accept it and run its endpoint to the end."""
    try:
        peer_address = stream.socket.getpeername()
        host, peer = str(peer_address[0]), f"{peer_address[0]}:{peer_address[1]}"
    except OSError:
        host = peer = "?"
    path = head.path
    # The listener serves plain TCP (the daemon has no TLS of its own): the daemon's own
    # origin, for the same-origin rule, is http://Host.
    refusal = target.upgrade_refusal(path, head.header, host, tls=False)
    if refusal is not None:
        body = error_body(refusal.error_type, refusal.message)
        response = ws.refusal_response(refusal.status, body, refusal.retry_after)
        try:
            await stream.send_all(response)
            await stream.send_eof()
            with trio.move_on_after(CLOSE_TIMEOUT):
                while await stream.receive_some(RECEIVE_BYTES):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(stream)
        return
    # A browser offers the token as a subprotocol next to ``sandboxd.v1`` and fails the
    # connection unless one it offered comes back; the SDKs offer none.
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in ws.offered_subprotocols(head) else None
    socket = WebSocket(stream, max_message, leftover)
    try:
        await socket.send_raw(ws.accept_response(key, subprotocol))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        stream.socket.close()
        return
    try:
        try:
            await target.serve_websocket(path, socket, peer)
        except Exception:
            log.exception("WebSocket endpoint failed", extra={"path": path, "peer": peer})
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await socket.send([], close=1011)
        await socket.finish()  # (a cancellation skips it: the connection is just dropped)
    finally:
        stream.socket.close()
