"""Protocol fuzzing (issue 6, item 5): hypothesis throws malformed JSON, wrong types,
unknown types, huge strings, binary frames and frames out of order at ``/execute/ws``, and
random yamux frames at ``/tunnel``, against one real daemon process. After every example
the daemon still answers; every frame it sent was a JSON object of a known type; bad first
frames are answered with an ``error`` frame or a close code. Meanwhile a command streams
to a client beside the fuzzers, and must arrive byte-exact.

``FUZZ_EXAMPLES`` sets the number of examples per fuzzer (``make test``: 100).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.sdk.conftest import DaemonProcess, daemon_process

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVER_TYPES = {"started", "stdout", "stderr", "gap", "exit", "error"}
CLIENT_TYPES = ["execute", "reconnect", "input", "close_stdin", "kill", "signal", "resize"]
#: Close codes a misbehaving client may get: normal, protocol error, unsupported data,
#: invalid payload, message too big.
CLOSE_CODES = {1000, 1002, 1003, 1007, 1009}
BYSTANDER = "for i in $(seq 0 99); do seq $((i*2000)) $((i*2000+1999)); sleep 0.05; done"


class EchoServer:
    """The one port the fuzzed tunnels may reach: echoes what it gets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.sock.close()


@pytest.fixture(scope="module")
def daemon(echo: EchoServer) -> Iterator[DaemonProcess]:
    with daemon_process(
        "--home", "/tmp", "--stop-grace", "1", "--ws-max-message-bytes", str(1024 * 1024),
        "--tunnel-ports", str(echo.port),
    ) as running:  # fmt: skip
        yield running


class Bystander(threading.Thread):
    """A command streaming beside the fuzzers, read by a well-behaved client."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.digest = hashlib.sha256()
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ws = SyncWebSocket(self.address, "/execute/ws", timeout=60)
            ws.send(TextMessage(json.dumps({"type": "execute", "command": BYSTANDER})))
            expected = 0
            for frame in ws.frames():
                message = json.loads(frame)
                if message["type"] == "stdout":
                    assert message["offset"] == expected
                    data = message["data"].encode()
                    expected += len(data)
                    self.digest.update(data)
                elif message["type"] == "exit":
                    self.exit_code = message["exit_code"]
        except BaseException as exc:  # reported by the last test
            self.error = exc


@pytest.fixture(scope="module")
def bystander(daemon: DaemonProcess) -> Iterator[Bystander]:
    thread = Bystander(daemon.address)
    thread.start()
    yield thread
    thread.join(timeout=60)


class SyncWebSocket:
    """A blocking wsproto client that sends whatever it is given."""

    def __init__(self, address: str, path: str, timeout: float = 0.5) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.close_code: int | None = None
        self.sock.sendall(self.conn.send(Request(host=address, target=path)))
        while True:
            events = self._receive()
            if any(isinstance(e, RejectConnection) for e in events):
                raise AssertionError("upgrade refused")
            if any(isinstance(e, AcceptConnection) for e in events):
                self._pending = [e for e in events if isinstance(e, Message)]
                return

    def _receive(self) -> list[Any]:
        data = self.sock.recv(65536)
        self.conn.receive_data(data or None)
        return list(self.conn.events())

    def send(self, event: Any) -> None:
        with contextlib.suppress(OSError):  # closed already: frames() reads what it said
            self.sock.sendall(self.conn.send(event))

    def frames(self) -> Iterator[str | bytes]:
        """Messages until the server closes (or goes quiet for the timeout)."""
        buffer: list[str | bytes] = []
        events: list[Any] = list(self._pending)
        self._pending = []
        try:
            while True:
                for event in events:
                    if isinstance(event, Message):
                        buffer.append(event.data)
                        if event.message_finished:
                            yield (
                                "".join(buffer) if isinstance(event.data, str) else b"".join(buffer)
                            )  # type: ignore[arg-type]
                            buffer = []
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        return
                events = self._receive()
                if not events and self.conn.state.name == "CLOSED":
                    return
        except (TimeoutError, OSError):
            return
        finally:
            self.sock.close()


def assert_alive(daemon: DaemonProcess) -> None:
    assert daemon.process.poll() is None, "the daemon died"
    with socket.create_connection(daemon.address.rsplit(":", 1), timeout=5) as conn:  # type: ignore[arg-type]
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.1 200")


# ---- strategies -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Commands a fuzzed execute may run: harmless whatever else the frame says.
safe_commands = st.sampled_from(["true", "echo fuzz", "sleep 0.2", "cat", "printf '\\377\\376'"])
field_values = json_values | st.integers(min_value=-(2**70), max_value=2**70) | safe_commands


@st.composite
def client_frames(draw: st.DrawFn) -> str:
    """A JSON object that looks like a client frame: a real or made-up type, real or
    made-up fields, values of any type."""
    kind = draw(st.sampled_from(CLIENT_TYPES) | st.text(max_size=12))
    fields = draw(
        st.dictionaries(
            st.sampled_from(
                ["command", "command_id", "data", "signal", "cols", "rows", "timeout_seconds",
                 "pty", "env", "cwd", "stdout_offset", "stderr_offset", "close_stdin",
                 "idle_timeout_seconds", "ttl_seconds", "kill_on_disconnect", "shell"]
            ) | st.text(max_size=8),
            field_values,
            max_size=6,
        )
    )  # fmt: skip
    if kind == "execute":
        fields["command"] = draw(safe_commands)
        fields.pop("shell", None)
        fields.pop("run_config", None)
    fields.pop("type", None)
    return json.dumps({"type": kind, **fields})


frames = st.one_of(
    client_frames().map(TextMessage),
    json_values.map(lambda v: TextMessage(json.dumps(v))),  # JSON, but not a frame
    st.text(max_size=200).map(TextMessage),  # not JSON at all
    st.binary(max_size=200).map(BytesMessage),
    st.integers(min_value=1, max_value=3 * 1024 * 1024).map(lambda n: TextMessage("x" * n)),
    st.just(TextMessage('{"type": "input", "data": "' + "y" * 500_000 + '"}')),
)


# ---- the fuzzers --------------------------------------------------------------------------


@FUZZ
@given(sequence=st.lists(frames, min_size=1, max_size=5))
def test_execute_ws_survives_any_frames_and_answers_bad_ones(
    daemon: DaemonProcess, bystander: Bystander, sequence: list[Message]
) -> None:
    ws = SyncWebSocket(daemon.address, "/execute/ws")
    for event in sequence:
        ws.send(event)
    received = list(ws.frames())
    messages = []
    for frame in received:
        assert isinstance(frame, str), "the server sends text frames only"
        message = json.loads(frame)
        assert isinstance(message, dict) and message["type"] in SERVER_TYPES, message
        messages.append(message)
    first = sequence[0]
    first_is_bad = isinstance(first, BytesMessage) or not _is_frame(first.data)
    if first_is_bad:  # refused: an error frame (and close 1000), or a close code
        answered = messages and messages[0]["type"] == "error"
        assert answered or ws.close_code in CLOSE_CODES - {1000}, (messages, ws.close_code)
    if ws.close_code is not None:
        assert ws.close_code in CLOSE_CODES, ws.close_code
    assert_alive(daemon)


yamux_frames = st.builds(
    lambda version, kind, flags, stream, payload, length: (
        struct.pack(">BBHII", version, kind, flags, stream, length if length >= 0 else len(payload))
        + payload
    ),
    st.sampled_from([0, 0, 0, 1, 255]),
    st.integers(min_value=0, max_value=5),
    st.integers(min_value=0, max_value=0xFFFF),
    st.sampled_from([0, 1, 2, 3, 5, 2**31]),
    st.binary(max_size=64),
    st.sampled_from([-1, -1, -1, 0, 3, 2**20, 2**32 - 1]),
)


@FUZZ
@given(
    sequence=st.lists(
        yamux_frames.map(BytesMessage)
        | st.binary(max_size=40).map(BytesMessage)
        | st.text(max_size=20).map(TextMessage),
        min_size=1,
        max_size=8,
    ),
    with_connect=st.booleans(),
)
def test_tunnel_survives_any_frames(
    daemon: DaemonProcess, echo: EchoServer, bystander: Bystander,
    sequence: list[Message], with_connect: bool,
) -> None:  # fmt: skip
    ws = SyncWebSocket(daemon.address, "/tunnel")
    if with_connect:  # a real stream first, so the garbage lands on a live session
        header = struct.pack(">BBHII", 0, 1, 1, 1, 0)  # WINDOW_UPDATE + SYN, stream 1
        connect = struct.pack(">BH", 1, echo.port)
        data = struct.pack(">BBHII", 0, 0, 0, 1, len(connect)) + connect
        ws.send(BytesMessage(header + data))
    for event in sequence:
        ws.send(event)
    for frame in ws.frames():
        assert isinstance(frame, bytes), "a tunnel speaks binary frames only"
    if ws.close_code is not None:
        assert ws.close_code in CLOSE_CODES, ws.close_code
    assert_alive(daemon)


def test_the_command_beside_the_fuzzers_arrived_byte_exact(bystander: Bystander) -> None:
    bystander.join(timeout=60)
    assert bystander.error is None, bystander.error
    expected = subprocess.run(["bash", "-c", BYSTANDER], capture_output=True, check=True).stdout
    assert bystander.exit_code == 0
    assert bystander.digest.hexdigest() == hashlib.sha256(expected).hexdigest()


def _is_frame(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") in CLIENT_TYPES
