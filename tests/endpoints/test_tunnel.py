"""``/tunnel`` with a raw yamux client over a binary WebSocket (protocol.md §6)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio
from trio_websocket import WebSocketConnection

from sandboxd.core import yamux
from sandboxd.core.yamux import Flag, Frame, FrameReader, FrameType
from tests.helpers import Daemon, open_ws, running_daemon


class YamuxClient:
    """The client side of the SDK's tunnel, reduced to what the tests drive."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.reader = FrameReader(max_payload=2**20)
        self.pending: list[Frame] = []

    async def send(self, frame: bytes) -> None:
        await self.ws.send_message(frame)

    async def open(self, stream_id: int, port: int, version: int = 1) -> None:
        await self.send(yamux.encode(FrameType.WINDOW_UPDATE, Flag.SYN, stream_id, 0))
        await self.send(yamux.data(stream_id, bytes([version]) + port.to_bytes(2, "big")))

    async def frame(self) -> Frame:
        while not self.pending:
            message = await self.ws.get_message()
            assert isinstance(message, bytes), "tunnel frames are binary"
            self.pending += self.reader.feed(message)
        return self.pending.pop(0)

    async def data_frame(self, stream_id: int) -> Frame:
        while True:
            frame = await self.frame()
            if frame.stream_id == stream_id and frame.type is FrameType.DATA:
                return frame


@asynccontextmanager
async def tunnel(daemon: Daemon) -> AsyncIterator[YamuxClient]:
    url = daemon.ws.replace("/execute/ws", "/tunnel")
    async with open_ws(url) as (ws, _):
        yield YamuxClient(ws)


@asynccontextmanager
async def tcp_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def echo_until_eof(stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        await stream.send_all(b"got " + str(len(data)).encode())


async def test_connect_copy_and_half_close(daemon: Daemon) -> None:
    with trio.fail_after(10):
        async with tcp_server(echo_until_eof) as port, tunnel(daemon) as client:
            await client.open(1, port)
            status = await client.data_frame(1)
            assert status.payload == b"\x00"
            await client.send(yamux.data(1, b"hello tunnel"))
            await client.send(yamux.data(1, b"", Flag.FIN))  # the target sees EOF
            reply = await client.data_frame(1)
            end = await client.data_frame(1)
    assert reply.payload == b"got 12"
    assert end.flags & Flag.FIN and end.payload == b""


async def test_status_bytes_for_refused_ports_and_versions() -> None:
    async with running_daemon(tunnel_ports="1-1024") as daemon:
        with trio.fail_after(10), trio.socket.socket() as unused:
            await unused.bind(("127.0.0.1", 0))
            free_port = unused.getsockname()[1]  # bound, not listening: refused
            async with tunnel(daemon) as client:
                await client.open(1, 8080 if free_port <= 1024 else free_port)
                not_allowed = await client.data_frame(1)
                await client.open(3, 1)  # allowed, nothing listening
                refused = await client.data_frame(3)
                await client.open(5, 1, version=2)
                bad_version = await client.data_frame(5)
    assert (not_allowed.payload, not_allowed.flags & Flag.FIN) == (b"\x01", Flag.FIN)
    assert refused.payload == b"\x02" and refused.flags & Flag.FIN
    assert bad_version.payload == b"\x03" and bad_version.flags & Flag.FIN


async def test_the_daemons_own_port_is_not_allowed_by_default(daemon: Daemon) -> None:
    own = int(daemon.running.address.rsplit(":", 1)[1])
    with trio.fail_after(10):
        async with tunnel(daemon) as client:
            await client.open(1, own)
            assert (await client.data_frame(1)).payload == b"\x01"


async def test_ping_is_answered_with_the_same_opaque(daemon: Daemon) -> None:
    with trio.fail_after(10):
        async with tunnel(daemon) as client:
            await client.send(yamux.encode(FrameType.PING, Flag.SYN, 0, 0xCAFE))
            pong = await client.frame()
    assert (pong.type, pong.flags, pong.length) == (FrameType.PING, Flag.ACK, 0xCAFE)


async def test_never_more_than_the_granted_window_is_in_flight(daemon: Daemon) -> None:
    async def flood(stream: trio.SocketStream) -> None:
        # The tunnel's end (the test leaving) closes the target while it still floods.
        with contextlib.suppress(trio.BrokenResourceError):
            async with stream:
                await stream.send_all(b"z" * (5 * 1024 * 1024))

    with trio.fail_after(15):
        async with tcp_server(flood) as port, tunnel(daemon) as client:
            await client.open(1, port)
            received = 0
            with trio.move_on_after(1.0):  # no WINDOW_UPDATE from us: it must stop
                while True:
                    received += len((await client.data_frame(1)).payload)
            assert received == yamux.INITIAL_WINDOW
            await client.send(yamux.encode(FrameType.WINDOW_UPDATE, Flag.NONE, 1, 100_000))
            with trio.move_on_after(1.0):
                while True:
                    received += len((await client.data_frame(1)).payload)
    assert received == yamux.INITIAL_WINDOW + 100_000


async def test_a_10_mb_upload_streams_through_with_window_updates(daemon: Daemon) -> None:
    digest: list[str] = []

    async def hash_until_eof(stream: trio.SocketStream) -> None:
        async with stream:
            h = hashlib.sha256()
            while chunk := await stream.receive_some(65536):
                h.update(chunk)
            digest.append(h.hexdigest())

    payload = os.urandom(10 * 1024 * 1024)
    with trio.fail_after(30):
        async with tcp_server(hash_until_eof) as port, tunnel(daemon) as client:
            await client.open(1, port)
            assert (await client.data_frame(1)).payload == b"\x00"
            window, sent = yamux.INITIAL_WINDOW, 0
            while sent < len(payload):
                while window == 0:
                    frame = await client.frame()
                    if frame.type is FrameType.WINDOW_UPDATE and frame.stream_id == 1:
                        window += frame.length
                piece = payload[sent : sent + min(window, 32 * 1024)]
                await client.send(yamux.data(1, piece))
                sent += len(piece)
                window -= len(piece)
            await client.send(yamux.data(1, b"", Flag.FIN))
            while not digest:
                await trio.sleep(0.01)
    assert digest == [hashlib.sha256(payload).hexdigest()]


async def test_frames_split_across_messages_any_way_still_work(daemon: Daemon) -> None:
    with trio.fail_after(10):
        async with tcp_server(echo_until_eof) as port, tunnel(daemon) as client:
            wire = (
                yamux.encode(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0)
                + yamux.data(1, b"\x01" + port.to_bytes(2, "big") + b"abc")
                + yamux.data(1, b"", Flag.FIN)
            )
            for i in range(len(wire)):
                await client.send(wire[i : i + 1])
            assert (await client.data_frame(1)).payload == b"\x00"
            assert (await client.data_frame(1)).payload == b"got 3"


async def test_go_away_tears_down_every_stream(daemon: Daemon) -> None:
    closed = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                pass
        closed.set()

    with trio.fail_after(10):
        async with tcp_server(hold) as port, tunnel(daemon) as client:
            await client.open(1, port)
            assert (await client.data_frame(1)).payload == b"\x00"
            await client.send(yamux.encode(FrameType.GO_AWAY, Flag.NONE, 0, 0))
            await closed.wait()
