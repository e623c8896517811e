"""Bounded sizes everywhere (issue 6, item 4): bodies, WebSocket messages and their
fragments, connections, sessions, and the time a request head may take."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pytest
import trio
from wsproto.events import BytesMessage, TextMessage

from tests.helpers import exec_socket, http_request, multipart, raw_ws, run_command, running_daemon

KiB = 1024
MiB = 1024 * KiB


async def test_an_oversized_json_body_gets_413_with_a_detail_body() -> None:
    async with running_daemon() as daemon:
        address = daemon.running.address
        with trio.fail_after(10):
            host, port = address.rsplit(":", 1)
            declared = await trio.open_tcp_stream(host, int(port))  # refused before its body
            async with declared:
                await declared.send_all(
                    b"POST /glob HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2097152\r\n\r\n"
                )
                raw = b""
                while chunk := await declared.receive_some(65536):
                    raw += chunk
            body = json.dumps({"pattern": "x" * MiB, "path": "/"}).encode()  # just over 1 MiB
            chunked = await http_request(
                address, "POST", "/glob", body, {"transfer-encoding": "chunked"}
            )
            after = await run_command(daemon.ws, "echo still here")
    head, _, detail = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(detail)["detail"]["error"] == "PayloadTooLarge"
    assert chunked.status == 413
    assert chunked.json()["detail"]["error"] == "PayloadTooLarge"
    assert after.text("stdout") == "still here\n"


async def test_a_request_head_that_never_ends_gets_431() -> None:
    async with running_daemon() as daemon:
        host, port = daemon.running.address.rsplit(":", 1)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
                raw = b""
                with contextlib.suppress(trio.BrokenResourceError):  # a reset after the 431
                    while not raw:
                        await stream.send_all(b"p" * 16 * KiB)
                        with trio.move_on_after(0.05):
                            raw = await stream.receive_some(65536)
    assert raw.startswith(b"HTTP/1.1 431")


async def test_an_upload_over_the_cap_is_refused_and_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "kept.txt"
    target.write_bytes(b"old")
    async with running_daemon(upload_max_bytes=64 * KiB) as daemon:
        address = daemon.running.address
        with trio.fail_after(10):
            small, headers = multipart(b"a" * KiB)
            small_path = f"/upload?path={tmp_path}/small"
            ok = await http_request(address, "POST", small_path, small, headers)
            big, headers = multipart(b"b" * (64 * KiB))  # with its multipart framing: over
            declared = await http_request(address, "POST", f"/upload?path={target}", big, headers)
            chunked = await http_request(
                address,
                "POST",
                f"/upload?path={target}",
                big,
                {**headers, "transfer-encoding": "chunked"},
            )
    assert ok.status == 200
    for refused in (declared, chunked):
        assert refused.status == 413
        assert refused.json()["detail"]["error"] == "PayloadTooLarge"
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["kept.txt", "small"]  # no temp file left


async def test_an_oversized_websocket_message_closes_1009_and_others_carry_on() -> None:
    async with running_daemon(ws_max_message_bytes=64 * KiB) as daemon:
        address = daemon.running.address
        with trio.fail_after(15):
            async with exec_socket(daemon.ws) as bystander:
                await bystander.start(command="read x; echo got $x")
                async with raw_ws(address) as ws:
                    await ws.send(TextMessage(data="x" * (65 * KiB)))
                    whole = await ws.wait_closed()
                async with raw_ws(address) as ws:  # many small fragments of one message
                    for _ in range(80):
                        await ws.send(TextMessage(data="y" * KiB, message_finished=False))
                    fragments = await ws.wait_closed()
                async with raw_ws(address) as ws:
                    await ws.send(BytesMessage(data=b"z" * (65 * KiB)))
                    binary = await ws.wait_closed()
                await bystander.send(type="input", data="on\n")
                t = await bystander.collect()
    assert (whole, fragments, binary) == (1009, 1009, 1009)
    assert t.text("stdout") == "got on\n"


async def test_a_binary_frame_after_an_oversized_text_one_is_no_daemon_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by test_fuzz.py: hypercorn keeps parsing after it sent 1009, and wrote the
    # next (binary) message into the oversized text message's buffer: a TypeError.
    async with running_daemon(ws_max_message_bytes=64 * KiB) as daemon:
        with trio.fail_after(10):
            async with raw_ws(daemon.running.address) as ws:
                await ws.send(TextMessage(data="x" * (65 * KiB)))
                await trio.sleep(0.1)  # the next message in a read of its own
                await ws.send(BytesMessage(data=b"z"))
                code = await ws.wait_closed()
            after = await run_command(daemon.ws, "echo fine")
    assert code == 1009
    assert after.text("stdout") == "fine\n"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_connections_over_the_cap_get_a_503_and_are_closed() -> None:
    async with running_daemon(max_connections=3) as daemon:
        host, port = daemon.running.address.rsplit(":", 1)
        with trio.fail_after(10):
            held = [await trio.open_tcp_stream(host, int(port)) for _ in range(3)]
            await trio.sleep(0.1)  # all three accepted
            extra = await trio.open_tcp_stream(host, int(port))
            raw = b""
            while chunk := await extra.receive_some(65536):
                raw += chunk
            await extra.aclose()
            for stream in held:
                await stream.aclose()
            await trio.sleep(0.1)
            after = await run_command(daemon.ws, "echo room again")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"retry-after: 1" in head
    assert json.loads(body)["detail"]["error"] == "TooManyConnections"
    assert after.text("stdout") == "room again\n"


async def test_sessions_over_the_cap_get_too_many_sessions() -> None:
    async with running_daemon(max_sessions=2) as daemon:
        with trio.fail_after(10):
            async with exec_socket(daemon.ws) as one, exec_socket(daemon.ws) as two:
                for client in (one, two):
                    await client.start(command="sleep 30")
                refused = await run_command(daemon.ws, "echo three")
                await one.send(type="kill")
                await one.collect()
    assert refused.frames[0]["type"] == "error"
    assert refused.frames[0]["error_type"] == "TooManySessions"


async def test_idle_and_slow_request_heads_time_out() -> None:
    async with running_daemon(handshake_timeout_seconds=1.0) as daemon:
        host, port = daemon.running.address.rsplit(":", 1)
        with trio.fail_after(10):
            idle = await trio.open_tcp_stream(host, int(port))
            start = trio.current_time()
            assert await idle.receive_some(1024) == b""
            idle_closed = trio.current_time() - start
            await idle.aclose()

            slow = await trio.open_tcp_stream(host, int(port))  # a byte every 0.1 s
            start = trio.current_time()
            request = b"GET /execute/ws HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 100
            try:
                for byte in request:
                    await slow.send_all(bytes([byte]))
                    with trio.move_on_after(0.1):
                        if await slow.receive_some(1024) == b"":
                            break
            except trio.BrokenResourceError:
                pass
            slow_closed = trio.current_time() - start
            await slow.aclose()
    assert 0.9 < idle_closed < 2.5
    assert 0.9 < slow_closed < 2.5
