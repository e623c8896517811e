"""The server side of RFC 6455 as data: the upgrade request, client frames, server frames.

sandboxd drives ``/execute/ws`` and ``/tunnel`` itself (``http/websocket.py``); this
module decides what the bytes mean and never touches a socket.

* ``parse_head`` reads an HTTP/1.1 request head; ``upgrade_route`` says whether it is a
  well-formed WebSocket upgrade to one of the lean paths (anything else is hypercorn's).
* ``FrameParser`` turns client bytes into ``Message``/``Ping``/``Close`` events, with the
  message size limit (1009), fragmentation, masking and the protocol checks (1002) and
  UTF-8 checks (1007) of the RFC. Once it has failed it stays failed.
* ``frame`` builds unmasked server frames; ``close_frame`` a close frame.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import unquote

#: The longest request head read before hypercorn is left to answer it (431).
MAX_HEAD_BYTES = 16 * 1024
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SLASHES = re.compile(r"/{2,}")
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 §5.2)."""

    CONTINUATION = 0
    TEXT = 1
    BINARY = 2
    CLOSE = 8
    PING = 9
    PONG = 10


class CloseCode(IntEnum):
    """The close codes sandboxd sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_PAYLOAD = 1007
    MESSAGE_TOO_BIG = 1009


# ---- the upgrade request -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed HTTP/1.1 request head. Header names are lower-cased, in order."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def path(self) -> str:
        """The target's path, percent-decoded, with runs of slashes collapsed."""
        return _SLASHES.sub("/", unquote(self.target.partition("?")[0]))


def head_end(buffer: bytes | bytearray) -> int:
    """The length of the complete request head at the start of ``buffer``, or -1."""
    end = buffer.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def parse_head(head: bytes) -> RequestHead | None:
    """The request head ``head`` (ending in a blank line), or None if it is not one."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    lines = text.split("\r\n")
    if len(lines) < 3 or lines[-2:] != ["", ""]:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or not parts[1].startswith("/"):
        return None
    if not _TOKEN.match(parts[0].encode("latin-1")):
        return None
    headers = []
    for line in lines[1:-2]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name.encode("latin-1")):
            return None
        headers.append((name.lower(), value.strip(" \t")))
    return RequestHead(parts[0], parts[1], tuple(headers))


def _has_token(value: str | None, token: str) -> bool:
    return value is not None and token in (v.strip().lower() for v in value.split(","))


def upgrade_key(head: RequestHead) -> str | None:
    """The ``Sec-WebSocket-Key`` of a valid version-13 upgrade request, else None."""
    if head.method != "GET":
        return None
    if not _has_token(head.header("upgrade"), "websocket"):
        return None
    if not _has_token(head.header("connection"), "upgrade"):
        return None
    if head.header("sec-websocket-version") != "13":
        return None
    key = head.header("sec-websocket-key")
    if key is None:
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    return key


def offers_deflate(head: RequestHead) -> bool:
    """Whether the client offers permessage-deflate."""
    return any(
        name == "sec-websocket-extensions" and "permessage-deflate" in value.lower()
        for name, value in head.headers
    )


def offered_subprotocols(head: RequestHead) -> list[str]:
    """The subprotocols the client offers, in order (every ``Sec-WebSocket-Protocol``
    line, split at commas)."""
    return [
        offered.strip()
        for name, value in head.headers
        if name == "sec-websocket-protocol"
        for offered in value.split(",")
        if offered.strip()
    ]


def accept_response(key: str, subprotocol: str | None = None) -> bytes:
    """The 101 that accepts an upgrade with ``key`` (no extension), naming
    ``subprotocol`` if given (it must be one the client offered)."""
    accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + _GUID).digest())
    chosen = b"sec-websocket-protocol: " + subprotocol.encode() + b"\r\n" if subprotocol else b""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: " + accept + b"\r\n" + chosen + b"\r\n"
    )


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
_REASONS |= {429: "Too Many Requests", 503: "Service Unavailable"}


def refusal_response(status: int, body: bytes, retry_after: int | None = None) -> bytes:
    """A complete JSON error response to an upgrade, closing the connection."""
    reason = _REASONS.get(status, "Error")
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n"
    )
    return head.encode() + body


# ---- server frames -------------------------------------------------------------------


def frame_header(opcode: Opcode, length: int) -> bytes:
    """The header of an unmasked, final server frame with ``length`` payload bytes."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def frame(opcode: Opcode, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    return frame_header(opcode, len(payload)) + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame; ``code`` None sends none (the answer to a close without one)."""
    if code is None:
        return frame(Opcode.CLOSE, b"")
    return frame(Opcode.CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])


# ---- client frames -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message (its fragments joined): ``str`` for text, else ``bytes``."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping, to be answered with a pong carrying ``payload``."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A pong: the answer to a ping of ours (or an unsolicited heartbeat)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The client's close frame: its code (None when it sent none) and reason."""

    code: int | None
    reason: str


Event = Message | Ping | Pong | Close


class ProtocolError(Exception):
    """The client broke RFC 6455; close the connection with ``code``."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def unmask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask`` (one big-integer XOR: C speed)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or (3000 <= code <= 4999)


class FrameParser:
    """Client bytes in, events out. After a violation of the protocol ``failed`` holds
    it (the connection is to be closed with its code) and nothing more is parsed; the
    events that came before it are still returned."""

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._message_opcode: Opcode | None = None
        self.failed: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; the complete events it finished, in order."""
        if self.failed is not None:
            return []
        self._buffer += data
        events: list[Event] = []
        try:
            while (event := self._next()) is not None:
                if isinstance(event, Message | Ping | Pong | Close):
                    events.append(event)
        except ProtocolError as exc:
            self.failed = exc
            self._buffer.clear()
            self._fragments.clear()
        return events

    def _next(self) -> Event | object | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if not second & 0x80:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "unknown opcode") from None
        fin = bool(first & 0x80)
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length = int.from_bytes(buffer[2:4], "big")
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length = int.from_bytes(buffer[2:10], "big")
            if length >> 63:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "frame length out of range")
            offset = 10
        control = opcode >= Opcode.CLOSE
        if control and (not fin or length > 125):
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "bad control frame")
        if not control and self._fragment_size + length > self._max:
            raise ProtocolError(CloseCode.MESSAGE_TOO_BIG, f"message over {self._max} bytes")
        end = offset + 4 + length
        if len(buffer) < end:
            return None
        payload = unmask(memoryview(buffer)[offset + 4 : end], bytes(buffer[offset : offset + 4]))
        del buffer[:end]
        if control:
            return self._control(opcode, payload)
        return self._data(opcode, fin, payload)

    def _control(self, opcode: Opcode, payload: bytes) -> Event | object:
        if opcode is Opcode.PING:
            return Ping(payload)
        if opcode is Opcode.PONG:
            return Pong(payload)
        if not payload:
            return Close(None, "")
        if len(payload) == 1:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "one-byte close payload")
        code = int.from_bytes(payload[:2], "big")
        if not _valid_close_code(code):
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            raise ProtocolError(CloseCode.INVALID_PAYLOAD, "close reason is not UTF-8") from None
        return Close(code, reason)

    def _data(self, opcode: Opcode, fin: bool, payload: bytes) -> Event | object:
        if opcode is Opcode.CONTINUATION:
            if self._message_opcode is None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "continuation of no message")
            kind = self._message_opcode
        else:
            if self._message_opcode is not None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
            kind = opcode
        if not fin:
            self._message_opcode = kind
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            return _NOTHING
        if self._fragments:
            self._fragments.append(payload)
            payload = b"".join(self._fragments)
            self._fragments = []
            self._fragment_size = 0
        self._message_opcode = None
        if kind is Opcode.BINARY:
            return Message(payload)
        try:
            return Message(payload.decode())
        except UnicodeDecodeError:
            raise ProtocolError(CloseCode.INVALID_PAYLOAD, "text message is not UTF-8") from None


_NOTHING = object()
