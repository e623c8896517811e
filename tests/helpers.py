"""Shared test tools: a real daemon on a real port, and a raw exec-WebSocket client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto import ConnectionState
from wsproto.events import Ping

from sandboxd.core.config import Config
from sandboxd.service import Running, make_listen_socket, serve

#: What the Python SDK accepts at most in one message; the daemon must stay below it.
SDK_MAX_MESSAGE = 2**20


async def _pong_unless_closing(self: WebSocketConnection, event: Ping) -> None:
    """trio-websocket 0.12.2 answers a ping that arrives after its own close frame, which
    wsproto refuses: LocalProtocolError out of the reader task. A server's ping may cross
    the client's close (RFC 6455 5.5.1; the daemon pings behind output to learn what was
    received), so a pong is only sent while the connection is open."""
    if self._wsproto.state is ConnectionState.OPEN:
        await self._send(event.response())


WebSocketConnection._handle_ping_event = _pong_unless_closing  # type: ignore[method-assign]


@dataclass
class Daemon:
    """An in-process sandboxd serving on 127.0.0.1."""

    running: Running

    @property
    def http(self) -> str:
        return f"http://{self.running.address}"

    @property
    def ws(self) -> str:
        return f"ws://{self.running.address}/execute/ws"


@asynccontextmanager
async def running_daemon(**overrides: Any) -> AsyncIterator[Daemon]:
    """Start sandboxd inside the test's trio run; stop it (gracefully) afterwards."""
    settings: dict[str, Any] = {"listen": "127.0.0.1:0", "stop_grace": 1.0}
    settings.update(overrides)
    config = Config(**settings)
    sock = make_listen_socket(config)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, config, sock)
        try:
            yield Daemon(running)
        finally:
            running.stop.set()


@dataclass
class Transcript:
    """Everything one exec socket received."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None

    @property
    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]

    def text(self, stream: str) -> str:
        return "".join(f["data"] for f in self.frames if f["type"] == stream)

    @property
    def terminal(self) -> dict[str, Any]:
        assert self.frames and self.frames[-1]["type"] in ("exit", "error"), self.types[-5:]
        return self.frames[-1]

    def assert_contiguous(self, stdout_from: int = 0, stderr_from: int = 0) -> None:
        """Property 5 of protocol.md §9: each stream's offsets follow on exactly."""
        expected = {"stdout": stdout_from, "stderr": stderr_from}
        for frame in self.frames:
            if frame["type"] in expected:
                assert frame["offset"] == expected[frame["type"]], (frame["type"], frame["offset"])
                expected[frame["type"]] += len(frame["data"].encode())


class ExecClient:
    """A raw client of ``/execute/ws`` (no SDK): send frames, read frames.

    ``stream`` is the TCP connection under the WebSocket: closing it is an abrupt drop.
    """

    def __init__(self, ws: WebSocketConnection, stream: trio.SocketStream) -> None:
        self.ws = ws
        self.stream = stream
        self.transcript = Transcript()

    async def send(self, **frame: Any) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        message = await self.ws.get_message()
        assert isinstance(message, str), "every server frame must be text"
        assert len(message.encode()) < SDK_MAX_MESSAGE
        frame: dict[str, Any] = json.loads(message)
        assert isinstance(frame, dict)
        self.transcript.frames.append(frame)
        return frame

    async def start(self, **fields: Any) -> dict[str, Any]:
        """Send an ``execute`` frame with ``fields``; its ``started`` frame."""
        await self.send(type="execute", **fields)
        return await self.recv_until("started")

    async def recv_until(self, *types: str) -> dict[str, Any]:
        while True:
            frame = await self.recv()
            if frame["type"] in types:
                return frame

    async def recv_until_text(self, stream: str, text: str) -> None:
        """Read until ``text`` has appeared in ``stream``'s output so far."""
        while text not in self.transcript.text(stream):
            await self.recv()

    async def collect(self) -> Transcript:
        """Read until the server closes; returns the whole transcript."""
        try:
            while True:
                await self.recv()
        except ConnectionClosed as closed:
            self.transcript.close_code = closed.reason.code
        return self.transcript


@asynccontextmanager
async def open_ws(
    url: str,
    headers: list[tuple[str, str]] | None = None,
    subprotocols: list[str] | None = None,
) -> AsyncIterator[tuple[WebSocketConnection, trio.SocketStream]]:
    """A client WebSocket over a TCP stream this helper owns and always closes;
    ``subprotocols`` are offered as a browser would (the SDKs offer none).

    (trio-websocket leaves its own stream open after a server-initiated close.)
    """
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        try:
            ws = await wrap_client_stream(
                nursery,
                stream,
                parts.netloc,  # Host with its port, as browsers and the SDKs send it
                parts.path or "/",
                extra_headers=headers,
                subprotocols=subprotocols,
                message_queue_size=4,
                max_message_size=SDK_MAX_MESSAGE,
            )
            try:
                yield ws, stream
            finally:
                await ws.aclose()
        finally:
            await stream.aclose()


async def rejection(
    url: str, headers: list[tuple[str, str]] | None = None, subprotocols: list[str] | None = None
) -> ConnectionRejected:
    """The refusal of an upgrade that must be refused (fails the test if it is accepted)."""
    try:
        async with open_ws(url, headers, subprotocols):
            pass
    except BaseExceptionGroup as group:
        matched, _ = group.split(ConnectionRejected)
        while isinstance(matched, BaseExceptionGroup):
            matched = matched.exceptions[0]
        if isinstance(matched, ConnectionRejected):
            return matched
        raise
    except ConnectionRejected as rejected:
        return rejected
    raise AssertionError(f"upgrade to {url} was accepted")


@asynccontextmanager
async def exec_socket(url: str) -> AsyncIterator[ExecClient]:
    """One exec WebSocket, with the Python SDK's 1 MiB message cap."""
    async with open_ws(url) as (ws, stream):
        yield ExecClient(ws, stream)


async def run_command(url: str, command: str, **fields: Any) -> Transcript:
    """Execute ``command`` on a fresh socket and read everything until the close."""
    frame: dict[str, Any] = {"type": "execute", "command": command, "close_stdin": True}
    frame.update(fields)
    async with exec_socket(url) as client:
        await client.send(**frame)
        return await client.collect()


@dataclass
class HttpResponse:
    """A complete HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    address: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    """One HTTP/1.1 request over a fresh connection (h11, no extra client library)."""
    import h11

    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        sent = {"host": address, **(headers or {})}
        if "transfer-encoding" not in sent:
            sent["content-length"] = str(len(body))
        request = h11.Request(method=method, target=path, headers=list(sent.items()))
        payload = conn.send(request) or b""
        if body:
            payload += conn.send(h11.Data(data=body)) or b""
        payload += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(payload)
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    assert response is not None
    found = {k.decode().lower(): v.decode() for k, v in response.headers}
    return HttpResponse(response.status_code, found, b"".join(chunks))


async def spend_auth_budget(address: str, token: str, count: int = 50) -> None:
    """``count`` requests from 127.0.0.1 with missing or wrong tokens; each must be refused
    with 401, or with 429 and ``Retry-After`` once the failure budget is spent."""
    from sandboxd.http.auth import MAX_FAILURES

    for i in range(count):
        headers = [{}, {"x-api-key": "wrong"}, {"authorization": f"Bearer {token}x"}][i % 3]
        response = await http_request(address, "GET", "/sessions", headers=headers)
        if i < MAX_FAILURES:
            assert response.status == 401, (i, response.status)
        else:
            assert response.status == 429, (i, response.status)
            assert int(response.headers["retry-after"]) >= 1


def multipart(
    content: bytes, name: str = "file", boundary: str = "sandboxd-test-b0undary"
) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with one part, as the SDKs send it."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="file"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + content + tail, {"content-type": f"multipart/form-data; boundary={boundary}"}


class RawWebSocket:
    """A WebSocket client built on wsproto that can send what well-behaved clients never
    do: fragments, binary frames, bytes that are no frame at all."""

    def __init__(self, stream: trio.SocketStream) -> None:
        from wsproto import ConnectionType, WSConnection

        self.stream = stream
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.close_code: int | None = None
        self.messages: list[str | bytes] = []

    async def handshake(self, host: str, path: str) -> None:
        from wsproto.events import AcceptConnection, Request

        await self.stream.send_all(self.conn.send(Request(host=host, target=path)))
        while not any(isinstance(e, AcceptConnection) for e in await self._events()):
            pass

    async def send(self, event: Any) -> None:
        """Send one wsproto event (``Message``, ``TextMessage(..., message_finished=False)``)."""
        await self.stream.send_all(self.conn.send(event))

    async def send_frames(self, *frames: dict[str, Any]) -> None:
        """Send JSON text frames back to back in one socket write, as a client that
        pipelines (an ``execute`` and its input without waiting for ``started``) does."""
        from wsproto.events import TextMessage

        data = b"".join(self.conn.send(TextMessage(data=json.dumps(f))) for f in frames)
        await self.stream.send_all(data)

    async def collect(self) -> Transcript:
        """Read until the server closes; every text frame received, as a transcript."""
        code = await self.wait_closed()
        frames = [json.loads(m) for m in self.messages if isinstance(m, str)]
        return Transcript(frames=frames, close_code=code)

    async def _events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        self.conn.receive_data(data or None)
        return list(self.conn.events())

    async def wait_closed(self) -> int | None:
        """Read until the server closes; its close code (None: the TCP stream just ended)."""
        from wsproto.events import CloseConnection, Message

        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.conn.receive_data(data)
                for event in self.conn.events():
                    if isinstance(event, Message):
                        self.messages.append(event.data)
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        return event.code
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None


@asynccontextmanager
async def raw_ws(address: str, path: str = "/execute/ws") -> AsyncIterator[RawWebSocket]:
    """A ``RawWebSocket`` after its upgrade; the TCP stream is closed afterwards."""
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        ws = RawWebSocket(stream)
        await ws.handshake(address, path)
        yield ws


@dataclass
class Ticks:
    """How many times a task that does nothing but yield has run (``counting_ticks``)."""

    count: int = 0


@asynccontextmanager
async def counting_ticks() -> AsyncIterator[Ticks]:
    """Run a task that counts its turns while the body runs: code under test that never
    lets the scheduler run leaves the count where it was."""
    ticks = Ticks()

    async def tick() -> None:
        while True:
            ticks.count += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await trio.lowlevel.checkpoint()  # (the ticker has started)
        yield ticks
        nursery.cancel_scope.cancel()


def is_spawner_helper(process: psutil.Process) -> bool:
    """Whether ``process`` is a daemon's spawner helper (runtime/spawner.py), which lives
    as long as the daemon; its ``comm`` is cut to 15 characters, its cmdline is whole."""
    try:
        return process.name() in ("sandboxd-spawner", "sandboxd-spawne")
    except psutil.Error:
        return False


def command_processes(daemon: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
    """The daemon's children (descendants, with ``recursive``) but its spawner helper:
    what its commands left behind, running or unreaped."""
    return [p for p in daemon.children(recursive=recursive) if not is_spawner_helper(p)]
