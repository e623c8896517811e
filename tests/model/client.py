"""A blocking exec-WebSocket client for the model: frames go out from the test's thread,
and a reader thread per socket records every frame that comes back, with its arrival time.

The reader can be fast, slow (small reads with pauses) or paused (reads nothing), so the
daemon meets clients that do not keep up. A socket can leave cleanly (close frame, then
wait for the server's close) or be reset (RST: SO_LINGER 0, nothing more is read).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

#: How long one send may wait for the daemon to take the bytes.
SEND_TIMEOUT = 15.0
#: The slow reader takes this many bytes at a time, then sleeps ``SLOW_PAUSE``.
SLOW_READ = 8192
SLOW_PAUSE = 0.02


class Mode(Enum):
    """How a socket's reader thread takes what the daemon sends."""

    FAST = "fast"
    SLOW = "slow"
    PAUSED = "paused"


@dataclass(frozen=True)
class Received:
    """One server frame and when it arrived (``time.monotonic()``)."""

    at: float
    frame: dict[str, Any]


class DaemonStoppedReading(AssertionError):
    """The daemon took no bytes from this socket for ``SEND_TIMEOUT`` seconds."""


class ModelSocket:
    """One ``/execute/ws`` connection."""

    def __init__(self, address: str, name: str) -> None:
        host, port = address.rsplit(":", 1)
        self.name = name
        self.address = address
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = WSConnection(ConnectionType.CLIENT)
        self._lock = threading.Lock()  # the wsproto connection and the socket's writes
        self._frames: list[Received] = []
        self._frames_lock = threading.Lock()
        self._parts: list[str] = []
        self.mode = Mode.FAST
        self.close_code: int | None = None
        self.end_reason = ""  # why the reader stopped: "eof", an OSError, or "" (it did not)
        self.ended = threading.Event()  # the reader stopped: server close, EOF or error
        self._stop = threading.Event()
        self._draining = False
        self.left: str | None = None  # "clean" or "reset" once the client left
        self._handshake(address)
        self.sock.settimeout(None)
        self.sock.setblocking(False)
        self._thread = threading.Thread(target=self._read, name=f"model-{name}", daemon=True)
        self._thread.start()

    def _handshake(self, address: str) -> None:
        self.sock.sendall(self.conn.send(Request(host=address, target="/execute/ws")))
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("the daemon closed during the upgrade")
            self.conn.receive_data(data)
            for event in self.conn.events():
                if isinstance(event, RejectConnection):
                    raise AssertionError(f"upgrade refused: {event.status_code}")
                if isinstance(event, AcceptConnection):
                    return
                self._handle(event)

    # ---- what came back ---------------------------------------------------------------

    def frames(self) -> list[Received]:
        """A copy of every frame received so far."""
        with self._frames_lock:
            return list(self._frames)

    def types(self) -> list[str]:
        """The ``type`` of every frame received so far."""
        return [r.frame["type"] for r in self.frames()]

    @property
    def finished(self) -> bool:
        """The server sent a terminal frame, or the connection is over."""
        if self.ended.is_set():
            return True
        frames = self.frames()
        return bool(frames) and frames[-1].frame["type"] in ("exit", "error")

    def offsets(self) -> tuple[int, int]:
        """The resume cursors an SDK would compute: ``offset + len(utf8(data))`` of the
        last chunk of each stream (or the end of the last gap)."""
        cursors = {"stdout": 0, "stderr": 0}
        for received in self.frames():
            frame = received.frame
            if frame["type"] in cursors:
                cursors[frame["type"]] = frame["offset"] + len(frame["data"].encode())
            elif frame["type"] == "gap":
                cursors[frame["stream"]] = frame["to"]
        return cursors["stdout"], cursors["stderr"]

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Poll until ``predicate(self)`` holds; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # ---- sending ----------------------------------------------------------------------

    def send(self, *frames: dict[str, Any]) -> None:
        """Send ``frames`` back to back, in one write (pipelined). Once the connection is
        over, nothing is sent."""
        with self._lock:
            if self.left is not None or self.conn.state is not ConnectionState.OPEN:
                return
            data = b"".join(self.conn.send(TextMessage(json.dumps(f))) for f in frames)
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + SEND_TIMEOUT
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the daemon closed the connection: nothing more can be said
            view = view[sent:]
            if view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DaemonStoppedReading(
                        f"{self.name}: the daemon took no bytes for {SEND_TIMEOUT} s "
                        f"({len(view)} bytes still to send)"
                    )
                select.select([], [self.sock], [], min(remaining, 0.1))

    def set_mode(self, mode: Mode) -> None:
        """Make the reader fast, slow or paused from now on."""
        self.mode = mode

    # ---- leaving ----------------------------------------------------------------------

    def close_clean(self, timeout: float = 10.0) -> None:
        """Send a close frame and read until the daemon closes (all it sent is kept)."""
        if self.left is not None:
            return
        with self._lock:
            self.left = "clean"
            if self.conn.state is ConnectionState.OPEN:
                self._write(self.conn.send(CloseConnection(code=1000)))
        self._draining = True
        self.ended.wait(timeout)
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def reset(self) -> None:
        """Drop the TCP connection with an RST; nothing more is read or sent."""
        if self.left is not None:
            return
        self.left = "reset"
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    # ---- the reader thread ------------------------------------------------------------

    def _read(self) -> None:
        try:
            while not self._stop.is_set() and not self.ended.is_set():
                mode = Mode.FAST if self._draining else self.mode
                if mode is Mode.PAUSED:
                    time.sleep(0.02)
                    continue
                readable, _, _ = select.select([self.sock], [], [], 0.05)
                if not readable:
                    continue
                size = SLOW_READ if mode is Mode.SLOW else 262144
                try:
                    data = self.sock.recv(size)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.end_reason = repr(exc)
                    break
                with self._lock:
                    self.conn.receive_data(data or None)
                    for event in self.conn.events():
                        self._handle(event)
                if not data:
                    self.end_reason = "eof"
                    break
                if mode is Mode.SLOW:
                    time.sleep(SLOW_PAUSE)
        finally:
            self.ended.set()

    def _handle(self, event: Any) -> None:
        """One wsproto event (called with ``_lock`` held, or during the handshake)."""
        if isinstance(event, Message):
            assert isinstance(event.data, str), f"{self.name}: a binary frame from the daemon"
            self._parts.append(event.data)
            if event.message_finished:
                frame = json.loads("".join(self._parts))
                self._parts = []
                assert isinstance(frame, dict), frame
                with self._frames_lock:
                    self._frames.append(Received(time.monotonic(), frame))
        elif isinstance(event, CloseConnection):
            if self.close_code is None:  # (wsproto reports 1006 again at the TCP EOF)
                self.close_code = event.code
            if self.conn.state is ConnectionState.REMOTE_CLOSING:
                with contextlib.suppress(OSError):
                    self.sock.sendall(self.conn.send(event.response()))
        elif isinstance(event, Ping) and self.conn.state is ConnectionState.OPEN:
            # A daemon's ping (sent behind output on the lean path) may cross this
            # client's close frame; nothing, a pong included, may follow that close
            # (wsproto refuses it), so a ping is answered only while the connection is open.
            with contextlib.suppress(OSError):
                self.sock.sendall(self.conn.send(event.response()))
