"""yamux framing: any split of the byte stream decodes to the same frames."""

from __future__ import annotations

import random

import pytest

from sandboxd.core import yamux
from sandboxd.core.yamux import Flag, Frame, FrameReader, FrameType


def test_the_sdks_captured_bytes_decode() -> None:
    wire = bytes.fromhex(
        "000100010000000100000000"  # WINDOW_UPDATE SYN stream 1
        "000000000000000100000003" + "0146aa"  # DATA stream 1: version 1, port 18090
        "000000040000000100000000"  # DATA FIN stream 1
        "000300000000000000000000"  # GO_AWAY normal
    )
    frames = FrameReader().feed(wire)
    assert frames == [
        Frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0),
        Frame(FrameType.DATA, Flag.NONE, 1, 3, b"\x01\x46\xaa"),
        Frame(FrameType.DATA, Flag.FIN, 1, 0),
        Frame(FrameType.GO_AWAY, Flag.NONE, 0, 0),
    ]


def test_any_split_gives_the_same_frames() -> None:
    rng = random.Random(3)
    wire = b"".join(
        yamux.data(2 * i + 1, rng.randbytes(rng.randrange(0, 3000))) for i in range(50)
    ) + yamux.encode(FrameType.PING, Flag.SYN, 0, 77)
    whole = FrameReader().feed(wire)
    for _ in range(20):
        reader, frames, at = FrameReader(), [], 0
        while at < len(wire):
            step = rng.randrange(1, 500)
            frames += reader.feed(wire[at : at + step])
            at += step
        assert frames == whole
    assert whole[-1] == Frame(FrameType.PING, Flag.SYN, 0, 77)


def test_unknown_types_and_oversized_data_are_violations() -> None:
    with pytest.raises(yamux.ProtocolViolation):
        FrameReader().feed(bytes.fromhex("000900000000000100000000"))
    with pytest.raises(yamux.ProtocolViolation):
        FrameReader(max_payload=10).feed(yamux.encode(FrameType.DATA, Flag.NONE, 1, 11))
