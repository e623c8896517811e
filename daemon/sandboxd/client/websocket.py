"""A small blocking WebSocket client (RFC 6455) on a plain socket, stdlib only.

It exists because the CLI must start fast: importing trio or wsproto costs more than the
whole of ``sandboxd exec -- true`` may take. It speaks only what the CLI needs: one
upgrade, text and binary messages, pings answered, a close handshake. The socket can be
waited on (``fileno``) with ``selectors``; ``receive`` then returns what is complete.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
from typing import NamedTuple
from urllib.parse import urlsplit

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
#: The most a single message may hold (the daemon sends at most about 400 KiB).
MAX_MESSAGE = 16 * 1024 * 1024


class Unreachable(Exception):
    """No TCP (or TLS) connection could be made."""


class Rejected(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class Closed(Exception):
    """The connection ended (close frame, EOF or a socket error)."""


class Target(NamedTuple):
    """Where a URL points: host, port, TLS, and the path prefix of a dataplane URL."""

    host: str
    port: int
    tls: bool
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Target:
        """``http(s)://host[:port][/prefix]``; ``ws(s)://`` is accepted too."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme in ("https", "wss")
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def open_socket(target: Target, timeout: float) -> socket.socket:
    """A connected TCP (or TLS) socket to ``target``; raises ``Unreachable``."""
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except OSError as exc:
        raise Unreachable(exc.strerror or str(exc)) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.tls:
        import ssl

        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise Unreachable(str(exc)) from None
    return sock


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    count = len(payload)
    repeated = (key * (count // 4 + 1))[:count]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(count, "big")


class WebSocket:
    """One client WebSocket. Not thread-safe; one reader, one writer (the same loop)."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self.sock = sock
        self._buffer = bytearray(leftover)
        self._fragments: list[bytes] = []
        self._fragment_op = OP_TEXT
        self.closed = False
        self.close_code: int | None = None

    @classmethod
    def connect(
        cls, target: Target, path: str, headers: dict[str, str], timeout: float = 30.0
    ) -> WebSocket:
        """Open ``path`` under the target's prefix; raises ``Unreachable`` or ``Rejected``."""
        sock = open_socket(target, timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {target.prefix}{path} HTTP/1.1",
            f"Host: {target.host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head, rest = _read_head(sock)
        except OSError as exc:
            sock.close()
            raise Unreachable(exc.strerror or str(exc)) from None
        status_line, _, header_text = head.partition("\r\n")
        fields = status_line.split(" ", 2)
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        found = _parse_headers(header_text)
        if status != 101:
            body = _read_body(sock, found, rest)
            sock.close()
            raise Rejected(status, body)
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if found.get("sec-websocket-accept") != accept:
            sock.close()
            raise Rejected(status, b"bad Sec-WebSocket-Accept")
        sock.settimeout(None)
        return cls(sock, rest)

    def fileno(self) -> int:
        """The socket's fd, for ``selectors``."""
        return self.sock.fileno()

    # ---- sending --------------------------------------------------------------------

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.closed:
            raise Closed("the connection is closed")
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        key = os.urandom(4)
        try:
            self.sock.sendall(head + key + _mask(payload, key))
        except OSError as exc:
            self._lost()
            raise Closed(str(exc)) from None

    def send_text(self, text: str) -> None:
        """Send one text message."""
        self._send_frame(OP_TEXT, text.encode())

    def send_binary(self, data: bytes) -> None:
        """Send one binary message."""
        self._send_frame(OP_BINARY, data)

    def close(self, code: int = 1000) -> None:
        """Send a close frame (best effort) and close the socket; never waits."""
        if not self.closed:
            with contextlib.suppress(Closed):
                self._send_frame(OP_CLOSE, struct.pack("!H", code))
        self._lost()

    def _lost(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    # ---- receiving ------------------------------------------------------------------

    def receive(self) -> list[str | bytes]:
        """Read once from the socket (blocking until something arrives) and return every
        complete message. Raises ``Closed`` when the connection has ended."""
        if self.closed:
            raise Closed("the connection is closed")
        messages = self._parse()
        if messages:
            return messages
        try:
            data = self.sock.recv(262144)
        except OSError as exc:
            self._lost()
            raise Closed(str(exc)) from None
        if not data:
            self._lost()
            raise Closed("the server closed the connection")
        self._buffer += data
        messages = self._parse()
        if self.closed and not messages:
            raise Closed(f"closed by the server ({self.close_code})")
        return messages

    def buffered(self) -> list[str | bytes]:
        """The complete messages among the bytes already read (never blocks)."""
        return self._parse()

    def _parse(self) -> list[str | bytes]:
        messages: list[str | bytes] = []
        buffer = self._buffer
        while not self.closed and len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length, start = second & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    break
                (length,) = struct.unpack_from("!H", buffer, 2)
                start = 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                (length,) = struct.unpack_from("!Q", buffer, 2)
                start = 10
            if length > MAX_MESSAGE:
                self.close(1009)
                raise Closed("message too big")
            if second & 0x80:  # a server must not mask; tolerate it anyway
                key = bytes(buffer[start : start + 4])
                start += 4
            else:
                key = b""
            if len(buffer) < start + length:
                break
            payload = bytes(buffer[start : start + length])
            del buffer[: start + length]
            if key:
                payload = _mask(payload, key)
            opcode, fin = first & 0x0F, bool(first & 0x80)
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
            elif opcode == OP_PONG:
                continue
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.close(self.close_code or 1000)
            else:
                if opcode != OP_CONT:
                    self._fragment_op = opcode
                self._fragments.append(payload)
                if fin:
                    whole = b"".join(self._fragments)
                    self._fragments = []
                    messages.append(whole.decode() if self._fragment_op == OP_TEXT else whole)
        return messages


def _read_head(sock: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionResetError(0, "the server closed the connection during the upgrade")
        data += piece
        if len(data) > 65536:
            raise ConnectionResetError(0, "response head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def _parse_headers(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return found


def _read_body(sock: socket.socket, headers: dict[str, str], rest: bytes) -> bytes:
    """The body of a refused upgrade (up to 16 KiB, with Content-Length only)."""
    try:
        wanted = min(int(headers.get("content-length", "0")), 16384)
    except ValueError:
        return rest
    body = rest
    try:
        while len(body) < wanted:
            piece = sock.recv(wanted - len(body))
            if not piece:
                break
            body += piece
    except OSError:
        pass
    return body[:wanted]
