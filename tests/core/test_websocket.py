"""The sans-IO WebSocket codec: upgrade heads, client frames with their limits, server
frames."""

from __future__ import annotations

import pytest

from sandboxd.core import websocket as ws
from sandboxd.core.websocket import Close, CloseCode, FrameParser, Message, Opcode, Ping, Pong

UPGRADE = (
    b"GET /execute/ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade"
    b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame, masked as clients must."""
    mask = b"\x12\x34\x56\x78"
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def failure(parser: FrameParser, data: bytes) -> CloseCode:
    assert parser.feed(data) == []
    assert parser.failed is not None
    return parser.failed.code


def test_a_valid_upgrade_head_parses_and_yields_its_key_and_rfc_accept() -> None:
    end = ws.head_end(UPGRADE + b"\x81")
    assert end == len(UPGRADE)
    head = ws.parse_head(UPGRADE)
    assert head is not None and head.path == "/execute/ws"
    assert ws.upgrade_key(head) == "dGhlIHNhbXBsZSBub25jZQ=="
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in ws.accept_response(
        "dGhlIHNhbXBsZSBub25jZQ=="
    )  # the example of RFC 6455 §1.3
    assert not ws.offers_deflate(head)


def test_offered_subprotocols_are_read_from_every_line_and_the_101_names_the_chosen_one() -> None:
    head = ws.parse_head(
        UPGRADE[:-2]
        + b"Sec-WebSocket-Protocol: sandboxd.v1 , sandboxd.token.eA\r\n"
        + b"Sec-WebSocket-Protocol: other\r\n\r\n"
    )
    assert head is not None
    assert ws.offered_subprotocols(head) == ["sandboxd.v1", "sandboxd.token.eA", "other"]
    plain = ws.parse_head(UPGRADE)
    assert plain is not None and ws.offered_subprotocols(plain) == []
    chosen = ws.accept_response("dGhlIHNhbXBsZSBub25jZQ==", "sandboxd.v1")
    assert chosen.endswith(b"\r\nsec-websocket-protocol: sandboxd.v1\r\n\r\n")
    assert b"sec-websocket-protocol" not in ws.accept_response("dGhlIHNhbXBsZSBub25jZQ==")


def test_paths_are_decoded_and_slashes_collapsed_and_the_query_dropped() -> None:
    head = ws.parse_head(b"GET //execute/%77s?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head is not None and head.path == "/execute/ws"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /execute/ws HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET /execute/ws\r\nHost: x\r\n\r\n",
        b"GET execute/ws HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /execute/ws HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /execute/ws HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"G(T /execute/ws HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_heads_that_are_not_http_1_1_requests_do_not_parse(raw: bytes) -> None:
    assert ws.parse_head(raw) is None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"GET ", b"POST "),
        (b"Upgrade: WebSocket", b"Upgrade: h2c"),
        (b"keep-alive, Upgrade", b"keep-alive"),
        (b"Version: 13", b"Version: 8"),
        (b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="),  # 5 bytes, not 16
        (b"dGhlIHNhbXBsZSBub25jZQ==", b"not base64!"),
    ],
)
def test_an_invalid_upgrade_has_no_key(old: bytes, new: bytes) -> None:
    head = ws.parse_head(UPGRADE.replace(old, new))
    assert head is not None and ws.upgrade_key(head) is None


def test_a_deflate_offer_is_seen() -> None:
    raw = UPGRADE.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
    head = ws.parse_head(raw)
    assert head is not None and ws.offers_deflate(head)


def test_refusals_carry_status_body_and_retry_after() -> None:
    raw = ws.refusal_response(503, b'{"detail":1}', retry_after=1)
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"retry-after: 1\r\n" in raw and b"content-length: 12\r\n" in raw
    assert raw.endswith(b"\r\n\r\n" + b'{"detail":1}')


@pytest.mark.parametrize(("length", "header_bytes"), [(0, 2), (125, 2), (126, 4), (65535, 4)])
def test_server_frames_are_unmasked_final_with_the_shortest_length(
    length: int, header_bytes: int
) -> None:
    data = ws.frame(Opcode.TEXT, b"a" * length)
    assert data[0] == 0x81 and not data[1] & 0x80
    assert len(data) == header_bytes + length
    assert len(ws.frame_header(Opcode.BINARY, 65536)) == 10


def test_close_frames_carry_the_code_or_nothing() -> None:
    assert ws.close_frame(1009) == b"\x88\x02\x03\xf1"
    assert ws.close_frame(None) == b"\x88\x00"


def test_messages_parse_from_any_split_of_the_bytes() -> None:
    data = masked(Opcode.TEXT, "héllo".encode()) + masked(Opcode.BINARY, b"\x00" * 300)
    for cut in range(len(data) + 1):
        parser = FrameParser(1024)
        events = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert events == [Message("héllo"), Message(b"\x00" * 300)]


def test_fragments_are_joined_and_control_frames_may_come_between() -> None:
    parser = FrameParser(1024)
    data = (
        masked(Opcode.TEXT, b"ab", fin=False)
        + masked(Opcode.PING, b"p")
        + masked(Opcode.CONTINUATION, b"cd", fin=False)
        + masked(Opcode.PONG, b"q")
        + masked(Opcode.CONTINUATION, b"ef")
    )
    assert parser.feed(data) == [Ping(b"p"), Pong(b"q"), Message("abcdef")]


def test_a_text_message_split_inside_a_utf8_character_is_whole_again() -> None:
    raw = "é".encode()
    parser = FrameParser(1024)
    data = masked(Opcode.TEXT, raw[:1], fin=False) + masked(Opcode.CONTINUATION, raw[1:])
    assert parser.feed(data) == [Message("é")]


def test_a_message_over_the_limit_is_1009_before_its_payload_arrives() -> None:
    parser = FrameParser(1024)
    header_only = masked(Opcode.TEXT, b"x" * 1025)[:8]
    assert failure(parser, header_only) == CloseCode.MESSAGE_TOO_BIG
    fragments = FrameParser(1024)
    assert fragments.feed(masked(Opcode.TEXT, b"x" * 1000, fin=False)) == []
    assert failure(fragments, masked(Opcode.CONTINUATION, b"x" * 25)) == 1009
    assert FrameParser(1024).feed(masked(Opcode.TEXT, b"x" * 1024)) == [Message("x" * 1024)]


@pytest.mark.parametrize(
    "data",
    [
        masked(Opcode.TEXT, b"x")[:1] + bytes([1]) + b"x",  # unmasked
        masked(Opcode.TEXT, b"x", rsv=0x40),  # RSV1 without an extension
        masked(3, b"x"),  # reserved opcode
        masked(Opcode.PING, b"p" * 126),  # control frame over 125 bytes
        masked(Opcode.PING, b"p", fin=False),  # fragmented control frame
        masked(Opcode.CONTINUATION, b"x"),  # continuation of nothing
        masked(Opcode.TEXT, b"a", fin=False) + masked(Opcode.TEXT, b"b"),  # nested message
        masked(Opcode.CLOSE, b"\x03"),  # one-byte close payload
        masked(Opcode.CLOSE, (1005).to_bytes(2, "big")),  # a code no one may send
        masked(Opcode.CLOSE, (999).to_bytes(2, "big")),
        bytes((0x82, 0xFF)) + (2**63).to_bytes(8, "big") + b"mask",  # length's top bit
    ],
)
def test_protocol_violations_are_1002(data: bytes) -> None:
    assert failure(FrameParser(2**20), data) == CloseCode.PROTOCOL_ERROR


def test_invalid_utf8_in_text_or_close_reason_is_1007() -> None:
    assert failure(FrameParser(1024), masked(Opcode.TEXT, b"\xff")) == 1007
    reason = (1000).to_bytes(2, "big") + b"\xff"
    assert failure(FrameParser(1024), masked(Opcode.CLOSE, reason)) == 1007


def test_close_frames_give_their_code_and_reason_or_none() -> None:
    parser = FrameParser(1024)
    events = parser.feed(
        masked(Opcode.CLOSE, (4000).to_bytes(2, "big") + b"bye") + masked(Opcode.CLOSE, b"")
    )
    assert events == [Close(4000, "bye"), Close(None, "")]


def test_what_came_before_a_violation_is_delivered_and_nothing_after() -> None:
    parser = FrameParser(1024)
    events = parser.feed(masked(Opcode.TEXT, b"ok") + masked(3, b"") + masked(Opcode.TEXT, b"no"))
    assert events == [Message("ok")]
    assert parser.failed is not None and parser.failed.code == 1002
    assert parser.feed(masked(Opcode.TEXT, b"later")) == []


def test_unmask_is_the_repeated_xor() -> None:
    payload = bytes(range(256)) * 5
    mask = b"\x01\x80\xff\x10"
    assert ws.unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert ws.unmask(b"", mask) == b""
