"""yamux framing (hashicorp/yamux spec) as the SDK's tunnel speaks it (protocol.md §6).

Sans-IO: ``FrameReader`` turns a byte stream, fed in arbitrary pieces (WebSocket message
boundaries mean nothing), into ``Frame`` objects; ``encode`` builds one frame.

    header: version u8 | type u8 | flags u16 | stream_id u32 | length u32  (big-endian)

For DATA, ``length`` bytes of payload follow; for the other types ``length`` is the
window delta (WINDOW_UPDATE), the opaque value (PING) or the error code (GO_AWAY).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

HEADER = struct.Struct(">BBHII")
VERSION = 0
INITIAL_WINDOW = 256 * 1024
#: Largest DATA payload sandboxd sends in one frame.
MAX_DATA = 64 * 1024


class FrameType(IntEnum):
    """The four yamux frame types."""

    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(IntFlag):
    """Frame flags."""

    NONE = 0
    SYN = 0x1
    ACK = 0x2
    FIN = 0x4
    RST = 0x8


class GoAwayCode(IntEnum):
    """Codes carried by GO_AWAY."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class ProtocolViolation(Exception):
    """The peer sent something yamux does not allow."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    flags: Flag
    stream_id: int
    length: int
    payload: bytes = b""


def encode(
    kind: FrameType, flags: Flag, stream_id: int, length: int, payload: bytes = b""
) -> bytes:
    """One frame's bytes (``length`` is the payload size for DATA)."""
    return HEADER.pack(VERSION, kind, flags, stream_id, length) + payload


def data(stream_id: int, payload: bytes, flags: Flag = Flag.NONE) -> bytes:
    """A DATA frame."""
    return encode(FrameType.DATA, flags, stream_id, len(payload), payload)


class FrameReader:
    """Incremental decoder. ``max_payload`` bounds a DATA frame a peer may announce."""

    def __init__(self, max_payload: int = INITIAL_WINDOW) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    def feed(self, chunk: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete. Raises ``ProtocolViolation``."""
        self._buffer += chunk
        frames: list[Frame] = []
        while len(self._buffer) >= HEADER.size:
            _, kind, flags, stream_id, length = HEADER.unpack_from(self._buffer)
            try:
                frame_type = FrameType(kind)
            except ValueError:
                raise ProtocolViolation(f"unknown frame type {kind}") from None
            if frame_type is FrameType.DATA:
                if length > self._max_payload:
                    raise ProtocolViolation(f"DATA frame of {length} bytes exceeds the window")
                if len(self._buffer) < HEADER.size + length:
                    break
                payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
                del self._buffer[: HEADER.size + length]
            else:
                payload = b""
                del self._buffer[: HEADER.size]
            frames.append(Frame(frame_type, Flag(flags), stream_id, length, payload))
        return frames
