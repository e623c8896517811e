"""Fast, verifying WebSocket clients (the ``websockets`` package, no compression).

Each run returns what arrived (byte count and sha256 of the command's output, reassembled)
and the times that matter, so that nothing fast-but-lossy can win.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


@dataclass
class RunResult:
    """One command as a client saw it."""

    nbytes: int = 0
    sha256: str = ""
    first_byte: float = 0.0  # seconds from connect to the first output byte
    elapsed: float = 0.0  # seconds from connect to the end
    exit_code: int | None = None
    gaps: int = 0
    frames: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _options() -> dict[str, Any]:
    return {"compression": None, "max_size": None, "ping_interval": None, "open_timeout": 30}


async def sandboxd_run(
    port: int,
    command: str,
    *,
    command_id: str | None = None,
    pty: bool = False,
    reconnect: tuple[int, int] | None = None,
    hash_output: bool = True,
) -> RunResult:
    """Run (or reattach to) a command on sandboxd and read until ``exit``."""
    result = RunResult()
    digest = hashlib.sha256()
    start = time.perf_counter()
    async with connect(f"ws://127.0.0.1:{port}/execute/ws", **_options()) as ws:
        if reconnect is None:
            frame: dict[str, Any] = {
                "type": "execute",
                "command": command,
                "command_id": command_id or uuid.uuid4().hex,
                "close_stdin": not pty,
                "pty": pty,
                "timeout_seconds": 0,
            }
        else:
            frame = {
                "type": "reconnect",
                "command_id": command_id,
                "stdout_offset": reconnect[0],
                "stderr_offset": reconnect[1],
            }
        await ws.send(_encode(frame).decode())
        expected_offset = reconnect[0] if reconnect else 0
        async for message in ws:
            msg = _decode(message)
            kind = msg["type"]
            if kind == "stdout":
                data = msg["data"].encode()
                if not result.nbytes:
                    result.first_byte = time.perf_counter() - start
                if msg["offset"] != expected_offset:
                    result.gaps += 1
                expected_offset = msg["offset"] + len(data)
                result.nbytes += len(data)
                result.frames += 1
                if hash_output:
                    digest.update(data)
            elif kind == "gap":
                result.gaps += 1
            elif kind == "exit":
                result.exit_code = msg["exit_code"]
                break
            elif kind == "error":
                raise RuntimeError(f"sandboxd error: {msg}")
    result.elapsed = time.perf_counter() - start
    result.sha256 = digest.hexdigest()
    return result


async def websocketd_run(port: int, *, lines: bool = False, hash_output: bool = True) -> RunResult:
    """Connect to websocketd (which starts its command) and read until it closes.

    In text mode websocketd sends one message per line, without the newline; it is put
    back so that the hash covers the same bytes as the command's output.
    """
    result = RunResult()
    digest = hashlib.sha256()
    start = time.perf_counter()
    async with connect(f"ws://127.0.0.1:{port}/", **_options()) as ws:
        try:
            async for message in ws:
                data = message.encode() + b"\n" if lines else message
                if isinstance(data, str):
                    data = data.encode()
                if not result.nbytes:
                    result.first_byte = time.perf_counter() - start
                result.nbytes += len(data)
                result.frames += 1
                if hash_output:
                    digest.update(data)
        except ConnectionClosedError:
            pass  # websocketd drops the TCP connection when its command exits
    result.elapsed = time.perf_counter() - start
    result.sha256 = digest.hexdigest()
    return result


async def slow_reader(port: int, frame: dict[str, Any], rate: int, stop: asyncio.Event) -> int:
    """A client that reads ``rate`` bytes a second off the TCP socket (a small receive
    buffer, no WebSocket parsing) until ``stop``; returns how much it read.

    It speaks just enough WebSocket to send one masked text frame, ``frame``.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=max(rate, 4096))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /execute/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")  # RFC 6455: no frame before the 101
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = _encode(frame)
    mask = os.urandom(4)
    assert len(payload) < 65536
    length = (
        bytes([0x80 | len(payload)])
        if len(payload) < 126
        else b"\xfe" + len(payload).to_bytes(2, "big")
    )
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(b"\x81" + length + mask + masked)
    total = 0
    try:
        while not stop.is_set():
            total += len(await reader.read(rate))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        writer.transport.abort()
    return total
