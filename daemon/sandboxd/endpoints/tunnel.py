"""``GET /tunnel``: TCP tunnels into the sandbox over yamux on a binary WebSocket (§6).

Every yamux stream the client opens carries a 3-byte connect header (version 1, port
u16); sandboxd answers one status byte (00 connected, 01 port not allowed, 02 nothing
listening, 03 bad version) and then copies bytes both ways with yamux flow control:

* toward the client it never has more in flight than the window the client granted
  (256 KiB, grown by its WINDOW_UPDATEs);
* from the client it buffers at most the window it granted, and grants more as the
  bytes are written to the target, so an upload of any size streams through.

A client FIN half-closes the target connection; the target's EOF becomes a FIN. A
GO_AWAY, a protocol error or the WebSocket's loss ends every stream of the session.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from sandboxd.core import yamux
from sandboxd.core.yamux import Flag, FrameType
from sandboxd.endpoints.transport import MessageTransport

log = logging.getLogger("sandboxd.tunnel")

CONNECT_VERSION = 1
STATUS_CONNECTED, STATUS_NOT_ALLOWED, STATUS_DIAL_FAILED, STATUS_BAD_VERSION = 0, 1, 2, 3
DIAL_TIMEOUT = 10.0


class PortPolicy:
    """Which target ports a tunnel may reach: a list like ``"22,8000-9000"``, or every
    port but the daemon's own when the list is empty."""

    def __init__(self, spec: str, own_port: int) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._own_port = own_port
        for part in filter(None, (p.strip() for p in spec.split(","))):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if not 1 <= first <= last <= 65535:
                raise ValueError(f"bad port range {part!r}")
            self._ranges.append((first, last))

    def allows(self, port: int) -> bool:
        if not self._ranges:
            return 1 <= port <= 65535 and port != self._own_port
        return any(first <= port <= last for first, last in self._ranges)


class _Stream:
    """One yamux stream: its windows, its inbound buffer, and its target connection."""

    def __init__(self, session: TunnelSession, stream_id: int) -> None:
        self.session = session
        self.id = stream_id
        self.send_window = yamux.INITIAL_WINDOW
        self.recv_window = yamux.INITIAL_WINDOW
        self.inbound = bytearray()
        self.remote_closed = False
        self.reset = False
        self.changed = trio.Event()
        self.scope = trio.CancelScope()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def read_exactly(self, count: int) -> bytes | None:
        while len(self.inbound) < count:
            if self.remote_closed or self.reset:
                return None
            await self.changed.wait()
        head = bytes(self.inbound[:count])
        del self.inbound[:count]
        return head

    async def run(self) -> None:
        session = self.session
        with self.scope:
            try:
                header = await self.read_exactly(3)
                if header is None:
                    return
                version, port = header[0], int.from_bytes(header[1:3], "big")
                if version != CONNECT_VERSION:
                    await session.send(yamux.data(self.id, bytes([STATUS_BAD_VERSION]), Flag.FIN))
                    return
                if not session.policy.allows(port):
                    await session.send(yamux.data(self.id, bytes([STATUS_NOT_ALLOWED]), Flag.FIN))
                    return
                try:
                    with trio.fail_after(DIAL_TIMEOUT):
                        target = await trio.open_tcp_stream("127.0.0.1", port)
                except (OSError, trio.TooSlowError):
                    await session.send(yamux.data(self.id, bytes([STATUS_DIAL_FAILED]), Flag.FIN))
                    return
                async with target:
                    await session.send(yamux.data(self.id, bytes([STATUS_CONNECTED])))
                    self.send_window -= 1
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._to_target, target)
                        await self._from_target(target)
            finally:
                session.streams.pop(self.id, None)

    async def _to_target(self, target: trio.SocketStream) -> None:
        """Client bytes to the target; grant the client more window as they are written."""
        while True:
            if self.inbound:
                chunk = bytes(self.inbound)
                self.inbound.clear()
                try:
                    await target.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.scope.cancel()
                    return
                self.recv_window += len(chunk)
                await self.session.send(
                    yamux.encode(FrameType.WINDOW_UPDATE, Flag.NONE, self.id, len(chunk))
                )
            elif self.remote_closed:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await target.send_eof()  # the client's FIN: half-close the target
                return
            else:
                await self.changed.wait()

    async def _from_target(self, target: trio.SocketStream) -> None:
        """Target bytes to the client, within the client's window; EOF becomes FIN."""
        while True:
            while self.send_window <= 0:
                await self.changed.wait()
            try:
                chunk = await target.receive_some(min(self.send_window, yamux.MAX_DATA))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                await self.session.send(yamux.data(self.id, b"", Flag.FIN))
                # The SDK treats either side ending as the end of the connection.
                self.scope.cancel()
                return
            self.send_window -= len(chunk)
            await self.session.send(yamux.data(self.id, chunk))


class TunnelSession:
    """One ``/tunnel`` WebSocket: the yamux session and its streams."""

    def __init__(self, send_bytes: Callable[[bytes], Awaitable[None]], policy: PortPolicy) -> None:
        self._send_bytes = send_bytes
        self._send_lock = trio.Lock()
        self.policy = policy
        self.streams: dict[int, _Stream] = {}
        self._reader = yamux.FrameReader()
        self.closed = False

    async def send(self, frame: bytes) -> None:
        async with self._send_lock:
            if not self.closed:
                await self._send_bytes(frame)

    async def feed(self, chunk: bytes, nursery: trio.Nursery) -> bool:
        """Handle bytes from the client; False once the session is over."""
        try:
            frames = self._reader.feed(chunk)
        except yamux.ProtocolViolation as exc:
            log.info("tunnel protocol error", extra={"error": str(exc)})
            await self.go_away(yamux.GoAwayCode.PROTOCOL_ERROR)
            return False
        for frame in frames:
            if not await self._handle(frame, nursery):
                return False
        return True

    async def go_away(self, code: yamux.GoAwayCode) -> None:
        await self.send(yamux.encode(FrameType.GO_AWAY, Flag.NONE, 0, code))
        self.closed = True

    async def _handle(self, frame: yamux.Frame, nursery: trio.Nursery) -> bool:
        if frame.type is FrameType.PING:
            if frame.flags & Flag.SYN:
                await self.send(yamux.encode(FrameType.PING, Flag.ACK, 0, frame.length))
            return True
        if frame.type is FrameType.GO_AWAY:
            return False
        stream = self.streams.get(frame.stream_id)
        if frame.flags & Flag.SYN:
            if stream is not None or frame.stream_id == 0:
                await self.go_away(yamux.GoAwayCode.PROTOCOL_ERROR)
                return False
            stream = _Stream(self, frame.stream_id)
            self.streams[frame.stream_id] = stream
            await self.send(yamux.encode(FrameType.WINDOW_UPDATE, Flag.ACK, stream.id, 0))
            nursery.start_soon(stream.run)
        if stream is None:
            return True  # a stream that already ended: late frames are dropped
        if frame.type is FrameType.DATA:
            stream.recv_window -= len(frame.payload)
            if stream.recv_window < 0:
                await self.send(yamux.encode(FrameType.WINDOW_UPDATE, Flag.RST, stream.id, 0))
                stream.reset = True
                stream.scope.cancel()
                return True
            stream.inbound += frame.payload
        else:
            stream.send_window += frame.length
        if frame.flags & Flag.FIN:
            stream.remote_closed = True
        if frame.flags & Flag.RST:
            stream.reset = True
            stream.scope.cancel()
        stream.wake()
        return True


async def serve_tunnel(transport: MessageTransport, policy: PortPolicy) -> None:
    """Run one accepted ``/tunnel`` WebSocket until the client leaves or says GO_AWAY."""

    async def send_bytes(frame: bytes) -> None:
        await transport.send([frame], binary=True)

    session = TunnelSession(send_bytes, policy)
    async with trio.open_nursery() as nursery:
        while True:
            message = await transport.receive()
            if message is None:
                break
            chunk = message.encode() if isinstance(message, str) else message
            if not await session.feed(chunk, nursery):
                break
        session.closed = True
        nursery.cancel_scope.cancel()
    await transport.send([], close=1000)
