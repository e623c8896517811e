"""``/upload`` and ``/download`` over raw HTTP against a real daemon (protocol.md §5)."""

from __future__ import annotations

import os
import pathlib
import stat
from urllib.parse import quote

import psutil
import pytest
import trio

from tests.helpers import Daemon, http_request, multipart, run_command, running_daemon


def q(path: str) -> str:
    return quote(path, safe="")


async def upload(daemon: Daemon, path: str, content: bytes) -> int:
    body, headers = multipart(content)
    response = await http_request(
        daemon.running.address, "POST", f"/upload?path={q(path)}", body, headers
    )
    return response.status


async def test_upload_writes_exact_bytes_creates_parents_and_overwrites(
    daemon: Daemon, tmp_path: pathlib.Path
) -> None:
    target = tmp_path / "new" / "deeper" / "f.bin"
    content = bytes(range(256)) * 1000 + b"\r\n--not-a-boundary\r\n"
    with trio.fail_after(10):
        assert await upload(daemon, str(target), content) == 200
        assert target.read_bytes() == content
        assert await upload(daemon, str(target), b"short") == 200
    assert target.read_bytes() == b"short"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]  # no temp file left


async def test_a_new_file_is_0644_and_an_overwrite_keeps_mode_and_owner(
    daemon: Daemon, tmp_path: pathlib.Path
) -> None:
    new, old = tmp_path / "new.txt", tmp_path / "old.sh"
    old.write_bytes(b"before")
    old.chmod(0o750)
    nobody = 65534
    os.chown(old, nobody, nobody)  # (the tests run as root)
    mask = os.umask(0o077)  # 0644 whatever the daemon's umask
    try:
        with trio.fail_after(10):
            assert await upload(daemon, str(new), b"fresh") == 200
            assert await upload(daemon, str(old), b"after") == 200
    finally:
        os.umask(mask)
    made, kept = new.stat(), old.stat()
    assert stat.S_IMODE(made.st_mode) == 0o644
    assert (stat.S_IMODE(kept.st_mode), kept.st_uid, kept.st_gid) == (0o750, nobody, nobody)
    assert old.read_bytes() == b"after" and new.read_bytes() == b"fresh"


async def test_relative_paths_land_under_home(tmp_path: pathlib.Path) -> None:
    async with running_daemon(home=str(tmp_path)) as daemon:
        with trio.fail_after(10):
            assert await upload(daemon, "rel/x.txt", b"x") == 200
            fetched = await http_request(
                daemon.running.address, "GET", "/download?path=rel%2Fx.txt"
            )
    assert (tmp_path / "rel" / "x.txt").read_bytes() == b"x" == fetched.body


async def test_an_interrupted_upload_leaves_the_old_file_and_no_partial_file(
    daemon: Daemon, tmp_path: pathlib.Path
) -> None:
    target = tmp_path / "keep.txt"
    target.write_bytes(b"previous content")
    body, headers = multipart(os.urandom(4 * 1024 * 1024))
    host, port = daemon.running.address.rsplit(":", 1)
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream(host, int(port))
        request = (
            f"POST /upload?path={q(str(target))} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        await stream.send_all(request + body[: len(body) // 2])
        await trio.sleep(0.3)  # the daemon is now writing the temp file
        assert len(list(tmp_path.iterdir())) == 2
        await trio.aclose_forcefully(stream)  # cut mid-body
        while len(list(tmp_path.iterdir())) > 1:
            await trio.sleep(0.02)
    assert target.read_bytes() == b"previous content"


@pytest.mark.parametrize(
    ("query", "body", "content_type", "says"),
    [
        ("", None, None, "path parameter is required"),
        ("?path=%2Ftmp%2Fa%00b", None, None, "NUL"),
        ("?path=%2Ftmp%2Fmp-bad", b"not multipart at all", None, "malformed multipart"),
        ("?path=%2Ftmp%2Fmp-bad", b"x", "text/plain", "multipart/form-data"),
    ],
)
async def test_bad_uploads_get_400_with_a_message_and_change_nothing(
    daemon: Daemon, query: str, body: bytes | None, content_type: str | None, says: str
) -> None:
    payload, headers = multipart(b"data")
    if body is not None:
        payload = body
    if content_type is not None:
        headers = {"content-type": content_type}
    with trio.fail_after(10):
        response = await http_request(
            daemon.running.address, "POST", f"/upload{query}", payload, headers
        )
    assert response.status == 400, response.body
    assert response.json()["detail"]["error"] == "InvalidRequest"
    assert says in response.json()["detail"]["message"]
    assert not os.path.exists("/tmp/mp-bad")


async def test_a_part_not_named_file_is_refused(daemon: Daemon, tmp_path: pathlib.Path) -> None:
    body, headers = multipart(b"data", name="other")
    with trio.fail_after(10):
        response = await http_request(
            daemon.running.address, "POST", f"/upload?path={q(str(tmp_path / 'x'))}", body, headers
        )
    assert response.status == 400 and "named 'file'" in response.json()["detail"]["message"]
    assert list(tmp_path.iterdir()) == []


async def test_uploading_onto_a_directory_is_a_write_error(
    daemon: Daemon, tmp_path: pathlib.Path
) -> None:
    with trio.fail_after(10):
        body, headers = multipart(b"data")
        response = await http_request(
            daemon.running.address, "POST", f"/upload?path={q(str(tmp_path))}", body, headers
        )
    assert response.json()["detail"]["error"] == "WriteError"


async def test_download_head_range_and_conditional_requests(
    daemon: Daemon, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "sixteen.txt"
    path.write_bytes(b"0123456789abcdef")
    base = f"/download?path={q(str(path))}"
    address = daemon.running.address
    with trio.fail_after(10):
        whole = await http_request(address, "GET", base, headers={"accept-encoding": "gzip"})
        head = await http_request(address, "HEAD", base)
        etag = head.headers["etag"]
        part = await http_request(address, "GET", base, headers={"range": "bytes=4-7"})
        clamped = await http_request(address, "GET", base, headers={"range": "bytes=10-99"})
        suffix = await http_request(address, "GET", base, headers={"range": "bytes=-100"})
        past = await http_request(address, "GET", base, headers={"range": "bytes=16-"})
        fresh = await http_request(
            address, "GET", base, headers={"range": "bytes=4-7", "if-range": etag}
        )
        stale = await http_request(
            address, "GET", base, headers={"range": "bytes=4-7", "if-range": '"stale"'}
        )
        same = await http_request(address, "GET", base, headers={"if-none-match": etag})
    assert whole.status == 200 and whole.body == b"0123456789abcdef"
    assert "content-encoding" not in whole.headers
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "16"
    assert etag.startswith('"') and head.headers["last-modified"].endswith("GMT")
    assert head.headers["content-type"] == "text/plain"
    assert (part.status, part.body, part.headers["content-range"]) == (206, b"4567", "bytes 4-7/16")
    assert (clamped.status, clamped.headers["content-range"]) == (206, "bytes 10-15/16")
    assert (suffix.status, suffix.body) == (206, b"0123456789abcdef")
    assert (past.status, past.headers["content-range"]) == (416, "bytes */16")
    assert (fresh.status, fresh.body) == (206, b"4567")
    assert (stale.status, stale.body) == (200, b"0123456789abcdef")
    assert (same.status, same.body, same.headers["etag"]) == (304, b"", etag)


async def test_the_etag_changes_on_a_same_size_rewrite_in_the_same_second(
    daemon: Daemon, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "f.txt"
    base = f"/download?path={q(str(path))}"
    with trio.fail_after(10):
        await upload(daemon, str(path), b"aaaa")
        first = (await http_request(daemon.running.address, "HEAD", base)).headers["etag"]
        path.write_bytes(b"bbbb")  # in place: same inode, same size
        second = (await http_request(daemon.running.address, "HEAD", base)).headers["etag"]
        await upload(daemon, str(path), b"cccc")
        third = (await http_request(daemon.running.address, "HEAD", base)).headers["etag"]
    assert len({first, second, third}) == 3


async def test_missing_files_and_directories_give_clear_errors(
    daemon: Daemon, tmp_path: pathlib.Path
) -> None:
    with trio.fail_after(10):
        missing = await http_request(
            daemon.running.address, "GET", f"/download?path={q(str(tmp_path / 'nope'))}"
        )
        directory = await http_request(
            daemon.running.address, "GET", f"/download?path={q(str(tmp_path))}"
        )
        head_missing = await http_request(
            daemon.running.address, "HEAD", f"/download?path={q(str(tmp_path / 'nope'))}"
        )
    assert missing.status == 404 and missing.json()["detail"]["error"] == "FileNotFound"
    assert directory.json()["detail"]["error"] == "ReadError"
    assert head_missing.status == 404


async def test_two_gigabyte_upload_and_download_stream_in_bounded_memory(
    tmp_path: pathlib.Path,
) -> None:
    from tests.sdk.conftest import start_daemon, stop_daemon

    size = 2 * 1024**3
    daemon = await trio.to_thread.run_sync(start_daemon)
    process = psutil.Process(daemon.process.pid)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            await trio.sleep(0.05)

    target = tmp_path / "big.bin"
    boundary = "b0undary-of-a-big-upload"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="file"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = os.urandom(1024 * 1024)
    try:
        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                host, port = daemon.address.rsplit(":", 1)
                async with await trio.open_tcp_stream(host, int(port)) as stream:
                    await stream.send_all(
                        (
                            f"POST /upload?path={q(str(target))} HTTP/1.1\r\nHost: x\r\n"
                            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                            f"Content-Length: {len(head) + size + len(tail)}\r\n\r\n"
                        ).encode()
                        + head
                    )
                    for _ in range(size // len(block)):
                        await stream.send_all(block)
                    await stream.send_all(tail)
                    reply = await stream.receive_some(65536)
                assert reply.startswith(b"HTTP/1.1 200"), reply
                assert target.stat().st_size == size
                received = 0
                async with await trio.open_tcp_stream(host, int(port)) as stream:
                    await stream.send_all(
                        f"GET /download?path={q(str(target))} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    )
                    header = b""
                    while b"\r\n\r\n" not in header:
                        header += await stream.receive_some(65536)
                    received = len(header.partition(b"\r\n\r\n")[2])
                    while received < size:
                        chunk = await stream.receive_some(1024 * 1024)
                        assert chunk
                        received += len(chunk)
                assert received == size
                nursery.cancel_scope.cancel()
    finally:
        target.unlink(missing_ok=True)
        await trio.to_thread.run_sync(stop_daemon, daemon)
    assert peak < 100 * 1024 * 1024, f"daemon RSS peaked at {peak / 2**20:.0f} MiB"


async def test_a_missing_home_is_created_by_an_upload_to_a_relative_path(
    tmp_path: pathlib.Path,
) -> None:
    home = tmp_path / "home" / "user"
    async with running_daemon(home=str(home)) as daemon:
        with trio.fail_after(10):
            before = await http_request(daemon.running.address, "GET", "/download?path=a.txt")
            assert await upload(daemon, "a.txt", b"made") == 200
            t = await run_command(daemon.ws, "pwd")
    assert before.status == 404
    assert (home / "a.txt").read_bytes() == b"made"
    assert t.text("stdout") == f"{home}\n"  # commands start there once it exists
