"""The lean WebSocket path (``http/websocket.py``): which upgrades it serves, the close
handshake and its codes, protocol errors, and bytes sent before the 101."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import uuid

import trio

from tests.helpers import Daemon, running_daemon

KEY = base64.b64encode(os.urandom(16)).decode()
MASK = b"\x0f\xf0\x55\xaa"


def upgrade(path: str = "/execute/ws", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def client_frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    assert len(payload) < 126
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + MASK + body


def execute(command: str) -> bytes:
    return client_frame(1, json.dumps({"type": "execute", "command": command}).encode())


class RawClient:
    """A TCP connection read as an HTTP response head followed by server frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def _more(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        self.buffer += chunk
        return bool(chunk)

    async def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            assert await self._more(), self.buffer
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head.lower()

    async def frame(self) -> tuple[int, bytes] | None:
        """The next server frame (opcode, payload); None at EOF."""
        while True:
            if len(self.buffer) >= 2:
                assert not self.buffer[1] & 0x80, "server frames are never masked"
                n, at = self.buffer[1] & 0x7F, 2
                if n == 126:
                    n, at = int.from_bytes(self.buffer[2:4], "big"), 4
                elif n == 127:
                    n, at = int.from_bytes(self.buffer[2:10], "big"), 10
                if len(self.buffer) >= at and len(self.buffer) >= at + n:
                    opcode, payload = self.buffer[0] & 0x0F, self.buffer[at : at + n]
                    self.buffer = self.buffer[at + n :]
                    return opcode, payload
            if not await self._more():
                return None

    async def close_code(self) -> int | None:
        """Read frames until the server's close; its code."""
        while (frame := await self.frame()) is not None:
            if frame[0] == 8:
                return int.from_bytes(frame[1][:2], "big") if frame[1] else None
        raise AssertionError("no close frame before EOF")


async def connect(daemon: Daemon, first: bytes) -> RawClient:
    host, port = daemon.running.address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(first)
    return RawClient(stream)


async def test_fresh_upgrades_are_served_by_the_lean_path_and_kept_alive_ones_by_hypercorn() -> (
    None
):
    async with running_daemon() as daemon:
        with trio.fail_after(15):
            fresh = await connect(daemon, upgrade())
            fresh_head = await fresh.head()
            await fresh.stream.send_all(execute("echo lean"))
            fresh_frames = [await fresh.frame() for _ in range(3)]
            await fresh.stream.aclose()

            reused = await connect(daemon, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            health = await reused.head()
            assert health.startswith(b"http/1.1 200")
            length = int(health.split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(reused.buffer) < length:
                assert await reused._more()
            reused.buffer = reused.buffer[length:]  # the body
            await reused.stream.send_all(upgrade())
            reused_head = await reused.head()
            await reused.stream.send_all(execute("echo asgi"))
            reused_frames = [await reused.frame() for _ in range(3)]
            await reused.stream.aclose()
    assert fresh_head.startswith(b"http/1.1 101") and b"hypercorn" not in fresh_head
    assert reused_head.startswith(b"http/1.1 101") and b"server: hypercorn" in reused_head
    for frames, word in ((fresh_frames, "lean"), (reused_frames, "asgi")):
        messages = [json.loads(p) for op, p in filter(None, frames) if op == 1]
        assert messages[0]["type"] == "started"
        assert "".join(m.get("data", "") for m in messages).startswith(word)


async def test_frames_sent_with_the_upgrade_request_are_not_lost() -> None:
    async with running_daemon() as daemon:
        with trio.fail_after(10):
            client = await connect(daemon, upgrade() + execute("echo early"))
            assert (await client.head()).startswith(b"http/1.1 101")
            texts = []
            while (frame := await client.frame()) is not None and frame[0] in (1, 9):
                if frame[0] == 1:  # (a ping may follow output: acknowledged delivery)
                    texts.append(json.loads(frame[1]))
            await client.stream.aclose()
    assert [t["type"] for t in texts] == ["started", "stdout", "exit"]
    assert frame is not None and frame[0] == 8 and frame[1][:2] == (1000).to_bytes(2, "big")


async def test_a_client_close_is_answered_with_its_own_code_or_none() -> None:
    async with running_daemon() as daemon:
        with trio.fail_after(10):
            codes = []
            for payload in ((4000).to_bytes(2, "big") + b"bye", b""):
                client = await connect(daemon, upgrade())
                await client.head()
                await client.stream.send_all(client_frame(8, payload))
                codes.append(await client.close_code())
                assert await client.frame() is None  # and then the server's FIN
                await client.stream.aclose()
    assert codes == [4000, None]


async def test_protocol_errors_close_1002_or_1007_and_the_daemon_serves_on() -> None:
    async with running_daemon() as daemon:
        with trio.fail_after(15):
            codes = []
            for bad in (
                client_frame(1, b'{"type":"kill"}', masked=False),  # unmasked
                client_frame(1, b"\xff\xfe"),  # not UTF-8
                client_frame(9, b"p")[:1] + bytes([0x80 | 0x7E]) + (200).to_bytes(2, "big"),
            ):
                client = await connect(daemon, upgrade())
                await client.head()
                await client.stream.send_all(bad)
                codes.append(await client.close_code())
                await client.stream.aclose()
            after = await connect(daemon, upgrade() + execute("echo on"))
            await after.head()
            started = await after.frame()
            await after.stream.aclose()
    assert codes == [1002, 1007, 1002]
    assert started is not None and json.loads(started[1])["type"] == "started"


async def test_pings_get_pongs_with_their_payload() -> None:
    async with running_daemon() as daemon:
        with trio.fail_after(10):
            client = await connect(daemon, upgrade())
            await client.head()
            await client.stream.send_all(client_frame(9, b"are you there"))
            pong = await client.frame()
            await client.stream.aclose()
    assert pong == (10, b"are you there")


async def test_deflate_is_declined_by_default_and_accepted_with_ws_compression() -> None:
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    heads = []
    for compression in (False, True):
        async with running_daemon(ws_compression=compression) as daemon:
            with trio.fail_after(10):
                client = await connect(daemon, upgrade(extra=offer))
                heads.append(await client.head())
                await client.stream.aclose()
    assert heads[0].startswith(b"http/1.1 101") and b"sec-websocket-extensions" not in heads[0]
    assert heads[1].startswith(b"http/1.1 101")
    assert b"sec-websocket-extensions: permessage-deflate" in heads[1]


async def test_an_invalid_upgrade_to_a_lean_path_is_hypercorns_to_answer() -> None:
    async with running_daemon() as daemon:
        with trio.fail_after(10):
            client = await connect(daemon, upgrade().replace(b"Version: 13", b"Version: 7"))
            head = await client.head()
            await client.stream.aclose()
    assert not head.startswith(b"http/1.1 101")
    assert b"server: hypercorn" in head


# ---- acknowledged delivery: pings behind the output, pongs pace the command -------------

RING = 256 * 1024
OUTPUT = 2_000_000
CHUNK = 64 * 1024


async def start_command(daemon: Daemon) -> tuple[RawClient, str]:
    command_id = uuid.uuid4().hex
    frame = {
        "type": "execute",
        "command": f"head -c {OUTPUT} /dev/zero | tr '\\0' x",
        "command_id": command_id,
    }
    client = await connect(daemon, upgrade())
    assert (await client.head()).startswith(b"http/1.1 101")
    await client.stream.send_all(client_frame(1, json.dumps(frame).encode()))
    return client, command_id


async def test_a_client_that_reads_but_delays_its_pongs_holds_the_command_half_a_ring_on() -> None:
    # The stall rule is out of reach (600 s): only the acknowledgements hold the command.
    async with running_daemon(ring_bytes=RING, stall_seconds=600.0) as daemon:
        with trio.fail_after(60):
            client, command_id = await start_command(daemon)
            received, held, types = 0, [], []
            while True:  # read everything that comes; answer the first ping only
                with trio.move_on_after(1.0) as quiet:
                    frame = await client.frame()
                if quiet.cancelled_caught or frame is None or frame[0] == 8:
                    break
                if frame[0] == 9:
                    if not types or held or received:
                        held.append(frame[1])
                    else:  # the ping behind `started`: acknowledges offset 0
                        await client.stream.send_all(client_frame(10, frame[1]))
                        types.append("pong")
                elif frame[0] == 1:
                    message = json.loads(frame[1])
                    types.append(message["type"])
                    received += len(message.get("data", "").encode())
            live = daemon.running.supervisor.sessions[command_id]
            end = live.core.stdout.end
            # The client has everything written; the command waits for its pong.
            assert live.core.state.value == "running" and RING // 2 - CHUNK < end <= RING // 2
            assert received == end and len(held) == 1  # one ping outstanding at a time
            await client.stream.send_all(client_frame(10, held[0]))
            while (frame := await client.frame()) is not None and frame[0] != 8:
                if frame[0] == 9:
                    await client.stream.send_all(client_frame(10, frame[1]))
                elif frame[0] == 1:
                    message = json.loads(frame[1])
                    types.append(message["type"])
                    received += len(message.get("data", "").encode())
            await client.stream.aclose()
    assert types[:2] == ["started", "pong"]
    assert received == OUTPUT and "gap" not in types and types[-1] == "exit"


async def test_a_client_that_never_pongs_is_paced_by_what_was_written_to_it() -> None:
    async with running_daemon(ring_bytes=RING, stall_seconds=600.0) as daemon:
        with trio.fail_after(60):
            client, _ = await start_command(daemon)
            received, pings, types = 0, 0, []
            while (frame := await client.frame()) is not None and frame[0] != 8:
                if frame[0] == 9:
                    pings += 1
                elif frame[0] == 1:
                    message = json.loads(frame[1])
                    types.append(message["type"])
                    received += len(message.get("data", "").encode())
            await client.stream.aclose()
    assert pings == 1  # the unanswered one stays outstanding: no more are sent
    assert received == OUTPUT and "gap" not in types and types[-1] == "exit"


async def test_a_signal_sent_just_before_the_client_resets_takes_effect_while_output_streams() -> (
    None
):
    # The client sends ``signal`` and its close, then resets the connection with the
    # daemon's output unread: the daemon's next write fails, and the frames the client
    # sent before it left must still be applied (the CLI's ``kill -s`` does this).
    async with running_daemon() as daemon:
        for _ in range(20):
            with trio.fail_after(20):
                client = await connect(daemon, upgrade())
                await client.head()
                command_id = uuid.uuid4().hex
                frame = {"type": "execute", "command": "yes", "command_id": command_id}
                await client.stream.send_all(client_frame(1, json.dumps(frame).encode()))
                started = await client.frame()
                assert started is not None and json.loads(started[1])["type"] == "started"
                while len(client.buffer) < 65536:  # the output is streaming
                    assert await client._more()
                signal = json.dumps({"type": "signal", "signal": "USR1"}).encode()
                client.stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                await client.stream.send_all(client_frame(1, signal) + client_frame(8, b"\x03\xe8"))
                client.stream.socket.close()  # a reset: what the daemon sent stays unread
                live = daemon.running.supervisor.sessions[command_id]
                await live.reaped.wait()
                assert live.status is not None and live.status.code == 138  # died of SIGUSR1
