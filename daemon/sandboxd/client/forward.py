"""``sandboxd port-forward [LOCAL:]REMOTE...``: local TCP ports carried to ports inside
the sandbox over one ``/tunnel`` WebSocket (yamux, protocol.md §6).

Each accepted local connection opens a yamux stream (odd ids), sends the 3-byte connect
header (version 1, port), waits for the status byte, then copies both ways within the
yamux windows: it never sends more than the daemon granted and grants the daemon more as
it writes the bytes to the local socket. This verb uses trio and wsproto (both runtime
dependencies); its start-up time does not matter like ``exec``'s.
"""

from __future__ import annotations

import contextlib
import signal
import sys

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
)

from sandboxd.client.connection import CliError, Endpoint
from sandboxd.core import yamux
from sandboxd.core.yamux import Flag, FrameType

GRANT_AT = yamux.INITIAL_WINDOW // 2
_STATUS = {1: "port not allowed by the daemon", 2: "nothing listening", 3: "bad version"}


def parse_ports(specs: list[str]) -> list[tuple[int, int]]:
    """``[LOCAL:]REMOTE`` -> (local, remote); ``:REMOTE`` or ``0:REMOTE`` picks a free port."""
    pairs = []
    for spec in specs:
        local, sep, remote = spec.rpartition(":")
        try:
            remote_port = int(remote)
            local_port = int(local) if local else (0 if sep else remote_port)
        except ValueError:
            raise CliError(f"bad port spec {spec!r}: expected [LOCAL:]REMOTE") from None
        if not (1 <= remote_port <= 65535 and 0 <= local_port <= 65535):
            raise CliError(f"bad port spec {spec!r}: ports are 1-65535")
        pairs.append((local_port, remote_port))
    return pairs


class _Stream:
    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.send_window = yamux.INITIAL_WINDOW
        self.inbound = bytearray()
        self.ungranted = 0
        self.closed = False
        self.changed = trio.Event()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Tunnel:
    """One ``/tunnel`` WebSocket and its yamux streams."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.tcp: trio.abc.Stream | None = None
        self.reader = yamux.FrameReader()
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.lock = trio.Lock()
        self.dead = trio.Event()

    async def connect(self) -> None:
        target = self.endpoint.target
        try:
            tcp: trio.abc.Stream = await trio.open_tcp_stream(target.host, target.port)
            if target.tls:
                import ssl

                tcp = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=target.host)
        except OSError as exc:
            raise self.endpoint.unreachable(exc.strerror or str(exc)) from None
        self.tcp = tcp
        headers = [(k.encode(), v.encode()) for k, v in self.endpoint.headers.items()]
        request = Request(
            host=target.host_header, target=target.prefix + "/tunnel", extra_headers=headers
        )
        await tcp.send_all(self.ws.send(request))
        while True:
            data = await tcp.receive_some(65536)
            if not data:
                raise self.endpoint.unreachable("the connection closed during the upgrade")
            self.ws.receive_data(bytes(data))
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    raise self.endpoint.refused(event.status_code, b"", "/tunnel")

    async def send(self, frame: bytes) -> None:
        assert self.tcp is not None
        async with self.lock:
            await self.tcp.send_all(self.ws.send(BytesMessage(data=frame)))

    async def read_loop(self) -> None:
        assert self.tcp is not None
        try:
            while data := await self.tcp.receive_some(262144):
                self.ws.receive_data(bytes(data))
                for event in self.ws.events():
                    if isinstance(event, BytesMessage):
                        for frame in self.reader.feed(bytes(event.data)):
                            await self._on_frame(frame)
                    elif isinstance(event, Ping):
                        async with self.lock:
                            await self.tcp.send_all(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, yamux.ProtocolViolation):
            return
        finally:
            self.dead.set()
            for stream in self.streams.values():
                stream.closed = True
                stream.wake()

    async def _on_frame(self, frame: yamux.Frame) -> None:
        if frame.type is FrameType.PING:
            if frame.flags & Flag.SYN:
                await self.send(yamux.encode(FrameType.PING, Flag.ACK, 0, frame.length))
            return
        if frame.type is FrameType.GO_AWAY:
            self.dead.set()
            return
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            return
        if frame.type is FrameType.DATA:
            stream.inbound += frame.payload
        else:
            stream.send_window += frame.length
        if frame.flags & (Flag.FIN | Flag.RST):
            stream.closed = True
        stream.wake()

    async def carry(self, local: trio.SocketStream, port: int) -> None:
        """Bridge one local connection to ``port`` in the sandbox."""
        stream = _Stream(self.next_id)
        self.next_id += 2
        self.streams[stream.id] = stream
        fin_sent = False
        try:
            async with local:
                await self.send(yamux.encode(FrameType.WINDOW_UPDATE, Flag.SYN, stream.id, 0))
                await self.send(yamux.data(stream.id, bytes([1]) + port.to_bytes(2, "big")))
                stream.send_window -= 3
                while not stream.inbound and not stream.closed:
                    await stream.changed.wait()
                if not stream.inbound or stream.inbound[0] != 0:
                    code = stream.inbound[0] if stream.inbound else -1
                    why = _STATUS.get(code, "the tunnel closed")
                    print(f"sandboxd: port {port} in the sandbox: {why}", file=sys.stderr)
                    return
                del stream.inbound[0]
                stream.ungranted += 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._to_local, stream, local, nursery.cancel_scope)
                    await self._from_local(stream, local)
                    fin_sent = True  # the local side's EOF half-closes the remote one
                    await self.send(yamux.data(stream.id, b"", Flag.FIN))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.streams.pop(stream.id, None)
            if not self.dead.is_set() and not fin_sent:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.send(yamux.data(stream.id, b"", Flag.FIN))

    async def _to_local(
        self, stream: _Stream, local: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        while True:
            if stream.inbound:
                chunk = bytes(stream.inbound)
                stream.inbound.clear()
                await local.send_all(chunk)
                stream.ungranted += len(chunk)
                if stream.ungranted >= GRANT_AT:
                    delta, stream.ungranted = stream.ungranted, 0
                    await self.send(
                        yamux.encode(FrameType.WINDOW_UPDATE, Flag.NONE, stream.id, delta)
                    )
            elif stream.closed:
                scope.cancel()  # the sandbox side ended: the connection is over
                return
            else:
                await stream.changed.wait()

    async def _from_local(self, stream: _Stream, local: trio.SocketStream) -> None:
        while True:
            while stream.send_window <= 0 and not stream.closed:
                await stream.changed.wait()
            if stream.closed:
                return
            data = await local.receive_some(min(stream.send_window, yamux.MAX_DATA))
            if not data:
                return
            stream.send_window -= len(data)
            await self.send(yamux.data(stream.id, data))


async def _forward(endpoint: Endpoint, address: str, pairs: list[tuple[int, int]]) -> int:
    tunnel = Tunnel(endpoint)
    await tunnel.connect()
    interrupted = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tunnel.read_loop)
            for local_port, remote in pairs:
                try:
                    listeners = await trio.open_tcp_listeners(local_port, host=address)
                except OSError as exc:
                    raise CliError(
                        f"cannot listen on {address}:{local_port}: {exc.strerror}"
                    ) from None

                async def handler(local: trio.SocketStream, remote: int = remote) -> None:
                    await tunnel.carry(local, remote)

                bound = listeners[0].socket.getsockname()[1]
                print(f"Forwarding from {address}:{bound} -> {remote}", flush=True)
                nursery.start_soon(trio.serve_listeners, handler, listeners)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    interrupted.set()
                    nursery.cancel_scope.cancel()

            async def stop_on_loss() -> None:
                await tunnel.dead.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(stop_on_loss)
    if not interrupted.is_set():
        raise CliError("the tunnel to the daemon was lost")
    return 0


def forward(endpoint: Endpoint, address: str, specs: list[str]) -> int:
    """Forward each ``[LOCAL:]REMOTE`` until Ctrl-C; 125 if the tunnel is lost."""
    pairs = parse_ports(specs)
    return trio.run(_forward, endpoint, address, pairs)
