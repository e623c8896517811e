"""The Python SDK's dataplane methods against a real sandboxd: files, search, tunnels,
and SSE execution (LANGSMITH_EXPERIMENTAL_FEATURES=sandbox_sse_exec)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import socket
import threading
from collections.abc import Iterator

import pytest
from langsmith.sandbox import (
    ResourceNotFoundError,
    Sandbox,
    SandboxOperationError,
)

from tests.sdk.conftest import DaemonProcess, daemon_process, sdk_sandbox

pytestmark = pytest.mark.sdk


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    home = tmp_path_factory.mktemp("home")
    with daemon_process(
        "--home", str(home), "--sse-ack-bytes", "65536", "--stop-grace", "1"
    ) as proc:
        yield proc


@pytest.fixture
def sb(daemon: DaemonProcess) -> Sandbox:
    return sdk_sandbox(daemon.url)


def test_write_read_stat_and_ranges(sb: Sandbox, tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "made" / "by" / "write.txt")
    sb.write(path, "héllo\nworld\n")
    assert sb.read(path) == "héllo\nworld\n".encode()
    stat = sb.stat(path)
    assert stat.size_bytes == 13 and stat.etag and stat.last_modified
    chunk = sb.read_range(path, start=7, end=100)
    assert (chunk.content, chunk.start, chunk.total_bytes, chunk.partial) == (
        b"world\n",
        7,
        13,
        True,
    )
    assert sb.read_range(path, suffix_bytes=3).content == b"ld\n"
    assert sb.read_range(path, start=0, if_none_match=stat.etag).unchanged is True
    sb.write(path, b"replaced.....")  # same size
    stale = sb.read_range(path, start=2, if_range=stat.etag)
    assert (stale.partial, stale.content) == (False, b"replaced.....")
    with pytest.raises(SandboxOperationError, match="past the end"):
        sb.read_range(path, start=13)


def test_relative_paths_resolve_from_home(sb: Sandbox) -> None:
    sb.write("notes/relative.txt", b"here")
    assert sb.read("notes/relative.txt") == b"here"
    assert sb.run("cat notes/relative.txt", timeout=10).stdout == "here"  # home is the cwd


def test_missing_files_raise_resource_not_found(sb: Sandbox, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ResourceNotFoundError):
        sb.read(str(tmp_path / "missing"))
    with pytest.raises(ResourceNotFoundError):
        sb.stat(str(tmp_path / "missing"))


def test_writing_onto_a_directory_is_a_write_error(sb: Sandbox, tmp_path: pathlib.Path) -> None:
    with pytest.raises(SandboxOperationError) as raised:
        sb.write(str(tmp_path), b"x")
    assert raised.value.operation == "write"


def test_glob_ls_and_grep(sb: Sandbox, tmp_path: pathlib.Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\nneedle here\n")
    (tmp_path / "b.txt").write_text("no match\n")
    found = sb.glob("**/*.py", path=str(tmp_path))
    assert [m.path for m in found.matches] == [str(tmp_path / "pkg" / "a.py")]
    assert found.truncated is False
    listed = sb.ls(str(tmp_path))
    assert {(m.path, m.is_dir) for m in listed.matches} == {
        (str(tmp_path / "b.txt"), False),
        (str(tmp_path / "pkg"), True),
    }
    hits = sb.grep("needle", path=str(tmp_path), glob="*.py")
    assert [(m.path, m.line, m.text) for m in hits.matches] == [
        (str(tmp_path / "pkg" / "a.py"), 2, "needle here")
    ]


def _serve(handler: object) -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tunnel_carries_100_mb_each_way_intact(sb: Sandbox) -> None:
    size = 100 * 1024 * 1024
    upstream = hashlib.sha256()

    def sink_then_send(conn: socket.socket) -> None:
        with conn:
            received = 0
            while received < size:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    return
                upstream.update(chunk)
                received += len(chunk)
            block = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256)) * 128
            sent = 0
            while sent < size:
                conn.sendall(block)
                sent += len(block)

    server, port = _serve(sink_then_send)
    payload = os.urandom(1 << 20)
    with (
        server,
        sb.tunnel(port, local_port=_free_port()) as tunnel,
        socket.create_connection(("127.0.0.1", tunnel.local_port), timeout=60) as conn,
    ):
        for _ in range(100):
            conn.sendall(payload)
        down = hashlib.sha256()
        received = 0
        while received < size:
            chunk = conn.recv(1 << 20)
            assert chunk
            down.update(chunk)
            received += len(chunk)
    block = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256)) * 128
    assert upstream.hexdigest() == hashlib.sha256(payload * 100).hexdigest()
    assert down.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()


def test_twenty_concurrent_tunnel_streams(sb: Sandbox) -> None:
    def echo(conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)

    server, port = _serve(echo)
    results: dict[int, bool] = {}
    with server, sb.tunnel(port, local_port=_free_port()) as tunnel:

        def client(i: int) -> None:
            data = os.urandom(300_000 + i)
            with socket.create_connection(("127.0.0.1", tunnel.local_port), timeout=60) as c:
                c.sendall(data)
                got = b""
                while len(got) < len(data):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            results[i] = got == data

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == dict.fromkeys(range(20), True)


def test_sse_runs_streams_and_resumes(sb: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGSMITH_EXPERIMENTAL_FEATURES", "sandbox_sse_exec")
    result = sb.run("echo héllo; echo err >&2; exit 3", timeout=10)
    assert (result.stdout, result.stderr, result.exit_code) == ("héllo\n", "err\n", 3)
    # 1 MB through responses of 64 KiB each: every one ends in ack_required and a resume.
    big = sb.run("python3 -c \"import sys; sys.stdout.write('é' * 500000)\"", timeout=30)
    assert big.stdout == "é" * 500_000
    seen: list[str] = []
    sb.run("for i in 1 2 3; do echo $i; sleep 0.1; done", on_stdout=seen.append, timeout=10)
    assert "".join(seen) == "1\n2\n3\n"
    handle = sb.run("echo first; sleep 0.5; echo second", wait=False, timeout=10)
    command_id = handle.command_id or ""
    assert handle.result.stdout == "first\nsecond\n"
    again = sb.reconnect(command_id, stdout_offset=6)
    assert again.result.stdout == "second\n"


def test_sse_with_ttl_0_returns_the_whole_output(
    sb: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANGSMITH_EXPERIMENTAL_FEATURES", "sandbox_sse_exec")
    # 12 MB in responses of 64 KiB: the command finishes long before the last resume.
    result = sb.run("head -c 12000000 /dev/zero | tr '\\0' z", ttl_seconds=0, timeout=60)
    assert result.stdout == "z" * 12_000_000 and result.exit_code == 0


def test_sse_and_websocket_share_one_session_table(
    sb: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANGSMITH_EXPERIMENTAL_FEATURES", "sandbox_sse_exec")
    handle = sb.run("echo over-sse; sleep 0.5; echo done", wait=False, timeout=10)
    command_id = handle.command_id or ""
    assert handle.result.exit_code == 0
    monkeypatch.setenv("LANGSMITH_EXPERIMENTAL_FEATURES", "")
    over_ws = sb.reconnect(command_id)
    assert over_ws.result.stdout == "over-sse\ndone\n"


def test_sse_timeout_and_unknown_resume(sb: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    from langsmith.sandbox import CommandTimeoutError

    monkeypatch.setenv("LANGSMITH_EXPERIMENTAL_FEATURES", "sandbox_sse_exec")
    with pytest.raises(CommandTimeoutError):
        sb.run("sleep 30", timeout=1)
    with pytest.raises(SandboxOperationError):
        sb.reconnect("no-such-command").result  # noqa: B018
