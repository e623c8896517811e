"""What a live upgrade does to the connections it finds: a request already on its way
when the upgrade starts draining is served, an execute waits for the upgrade's outcome
(then the SDKs re-send it to the new image), and no connection the old image accepted
is cut by the exec without an answer."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import h11
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.helpers import exec_socket, multipart
from tests.runtime.test_upgrade import FAULT, Follower, healthz, wait_generation
from tests.sdk.conftest import DaemonProcess, daemon_process


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> Iterator[DaemonProcess]:
    monkeypatch.delenv(FAULT, raising=False)
    with daemon_process("--stop-grace", "1", "--home", "/tmp") as running:
        yield running


async def _logged(daemon: DaemonProcess, message: str) -> None:
    while not any(e.get("msg") == message for e in daemon.logs):
        await trio.sleep(0.01)


async def _response(stream: trio.SocketStream) -> tuple[h11.Response, bytes]:
    """The whole response on ``stream`` (fails on a connection cut before its end)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            return h11.Response(status_code=101, headers=event.headers), b""
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, body


async def test_an_upload_under_way_when_the_upgrade_drains_is_served_and_an_execute_waits(
    daemon: DaemonProcess,
) -> None:
    """The upload holds the drain; an execute sent meanwhile gets no ``error`` frame (it
    would end the SDKs' ``run()``) but, at the swap, a close 1000 before ``started``, and
    the same execute sent again runs in the new image."""
    address = daemon.address
    target = f"/tmp/sandboxd-drain-{uuid.uuid4().hex}"
    body, headers = multipart(b"x" * 200_000)
    host, port = address.rsplit(":", 1)
    command_id = uuid.uuid4().hex
    execute = {"command": "echo ran; exit 3", "close_stdin": True, "command_id": command_id}
    with trio.fail_after(60):
        upload = await trio.open_tcp_stream(host, int(port))
        async with upload, exec_socket(f"ws://{address}/execute/ws") as client:
            head = (
                f"POST /upload?path={quote(target)} HTTP/1.1\r\nhost: {address}\r\n"
                f"content-type: {headers['content-type']}\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode()
            await upload.send_all(head + body[:1000])
            await healthz(address)  # (the upload's connection was accepted before it)
            await trio.sleep(0.2)  # (and its head has reached the handler)
            daemon.process.send_signal(signal.SIGUSR2)
            await _logged(daemon, "upgrade draining")
            await client.send(type="execute", **execute)
            with trio.move_on_after(0.5):
                frame = await client.recv()
                raise AssertionError(f"a frame while the upgrade drains: {frame}")
            await upload.send_all(body[1000:])
            response, answer = await _response(upload)
            assert response.status_code == 200, answer
            with pytest.raises(ConnectionClosed) as closed:
                frame = await client.recv()
                raise AssertionError(f"a frame before the swap's close: {frame}")
            assert closed.value.reason.code == 1000
        health = await wait_generation(address, 1)
        assert health["last_upgrade"]["result"] == "ok"
        again = Follower(address, execute)
        await again.run()
    assert again.terminal is not None and again.terminal["exit_code"] == 3
    assert again.stdout == "ran\n"
    with open(target, "rb") as written:
        assert written.read() == b"x" * 200_000
    with trio.fail_after(10):  # (log lines reach the test a little after the fact)
        await _logged(daemon, "command started")
        await trio.sleep(0.3)
    started = [e for e in daemon.logs if e.get("msg") == "command started"]
    assert [e["command_id"] for e in started] == [command_id]  # once, by the new image


@pytest.mark.parametrize(
    "request_head",
    [
        "GET /healthz HTTP/1.1\r\nhost: {address}\r\n\r\n",
        "GET /execute/ws HTTP/1.1\r\nhost: {address}\r\nupgrade: websocket\r\n"
        "connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "sec-websocket-version: 13\r\n\r\n",
    ],
    ids=["http", "websocket"],
)
async def test_a_request_head_finished_after_the_upgrade_closed_the_clients_is_answered(
    daemon: DaemonProcess, request_head: str
) -> None:
    """A connection the old image accepted, whose head is only finished once the swap
    has closed the clients, gets a whole answer (a 503 to retry; or, if it was still in
    the backlog, the new image's answer), never a connection closed with none."""
    address = daemon.address
    host, port = address.rsplit(":", 1)
    head = request_head.format(address=address).encode()
    with trio.fail_after(60):
        watcher = Follower(address, {"command": "sleep 3; echo done", "close_stdin": True})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.run)
            while watcher.command_id is None:
                await trio.sleep(0.01)
            async with await trio.open_tcp_stream(host, int(port)) as late:
                await late.send_all(head[:10])
                await healthz(address)  # (the late connection has been accepted by now)
                daemon.process.send_signal(signal.SIGUSR2)
                while not watcher.closes:  # closed 1001: the swap is closing the clients
                    await trio.sleep(0.005)
                await late.send_all(head[10:])
                response, body = await _response(late)
        assert response.status_code in (503, 200, 101), (response, body)
        if response.status_code == 503:
            assert json.loads(body)["detail"]["error"] == "ServerShuttingDown"
            assert (b"retry-after", b"1") in response.headers
        await wait_generation(address, 1)
    assert watcher.terminal is not None and watcher.terminal["exit_code"] == 0
    assert watcher.stdout == "done\n"
