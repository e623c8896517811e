"""The dataplane rows of ``make bench``: small files through the real Python SDK,
``/download`` and ``/upload`` beside Debian's nginx, and ``/tunnel`` beside a direct
loopback TCP copy.

The HTTP and TCP clients are plain blocking sockets in a thread (``recv_into`` a 1 MiB
buffer, ``sendfile`` for upload bodies): a loop of a few thousand system calls per GiB,
so the client is never what limits a row, and it is the same client for both servers.
Every transfer is checked: the files and streams are a random 1 MiB block repeated, and
what arrives must have the exact byte count and, at the start of every piece received,
the pattern's bytes at that offset (a spot check, cheap beside a checksum, which at about
3 GB/s here would slow the client down as much as nginx does). An uploaded file is then
checked whole (CRC-32), outside the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from servers import Server, nginx_path, start_nginx

if TYPE_CHECKING:
    from run import Bench

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = os.urandom(MiB)


class Spot:
    """The check of a stream of the pattern as it arrives (see the module docstring)."""

    def __init__(self) -> None:
        self.received = 0
        self.mismatches = 0

    def feed(self, piece: memoryview | bytes) -> None:
        at = self.received % MiB
        count = min(len(piece), 64, MiB - at)
        if piece[:count] != BLOCK[at : at + count]:
            self.mismatches += 1
        self.received += len(piece)

    def check(self, size: int, what: str) -> None:
        if (self.received, self.mismatches) != (size, 0):
            raise AssertionError(
                f"{what}: {self.received} of {size} bytes, {self.mismatches} pieces wrong"
            )


def _crc_of_pattern(size: int) -> int:
    """CRC-32 of ``size`` bytes of BLOCK repeated."""
    crc = 0
    for start in range(0, size, MiB):
        crc = zlib.crc32(memoryview(BLOCK)[: min(MiB, size - start)], crc)
    return crc


def _make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for start in range(0, size, MiB):
            f.write(memoryview(BLOCK)[: min(MiB, size - start)])


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            crc = zlib.crc32(chunk, crc)
    return crc


def stat(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]}


# ---- small files through the SDK ------------------------------------------------------


def _sdk_round_trips(
    url: str, directory: str, batches: int, per_batch: int, server: Server
) -> tuple[list[float], float]:
    """Round trips/s of each batch (write 1 KiB, read it back, compare), and the server's
    CPU ms per round trip over all of them."""
    from langsmith.sandbox import Sandbox, SandboxClient

    # As tests/sdk/conftest.py's sdk_sandbox: the control-plane URL is never called.
    client = SandboxClient(
        api_key="bench", api_endpoint="http://127.0.0.1:9/api/v2/sandboxes", max_retries=0
    )
    sb = Sandbox.from_dict(
        {"name": "bench", "dataplane_url": url}, client=client, auto_delete=False
    )
    path = f"{directory}/small.bin"
    sb.write(path, b"warm up")  # the connection, the imports
    assert sb.read(path) == b"warm up"
    rates = []
    cpu0 = server.cpu_seconds()
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            content = os.urandom(1024)
            sb.write(path, content)
            if sb.read(path) != content:
                raise AssertionError("SDK read back something else than it wrote")
        rates.append(per_batch / (time.perf_counter() - start))
    cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / (batches * per_batch)
    return rates, cpu_ms


async def sdk_files(bench: Bench, sandboxd: Server) -> None:
    """Small-file write + read round trips per second through langsmith's ``Sandbox``."""
    batches, per_batch = (2, 10) if bench.quick else (5, 100)
    with tempfile.TemporaryDirectory(prefix="bench-sdk-") as directory:
        rates, cpu_ms = await asyncio.to_thread(
            _sdk_round_trips,
            f"http://127.0.0.1:{sandboxd.port}",
            directory,
            batches,
            per_batch,
            sandboxd,
        )
    rate = stat(rates)
    bench.results["sdk_small_files"] = {
        "round_trips": batches * per_batch,
        "bytes": 1024,
        "per_s": rate,
        "sandboxd_cpu_ms_per_round_trip": cpu_ms,
    }
    bench.row("SDK 1 KiB write + read round trips", "trips/s", rate, None, "")
    bench.row("SDK round trip: server CPU", "ms", stat([cpu_ms]), None, "")


# ---- /download and /upload beside nginx -----------------------------------------------


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_head(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and the body bytes read with the head."""
    head = b""
    while b"\r\n\r\n" not in head:
        n = sock.recv_into(buf)
        if not n:
            raise AssertionError(f"the connection closed in the response head: {head!r}")
        head += buf[:n]
    raw, _, rest = head.partition(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, rest


def http_get(port: int, target: str, size: int) -> float:
    """Seconds from connect to the last byte of ``GET target``, which must be ``size``
    bytes of the pattern."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    start = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        status, headers, rest = _read_head(sock, buf)
        if status != 200 or int(headers.get("content-length", -1)) != size:
            raise AssertionError(f"GET {target}: {status} {headers}")
        spot = Spot()
        if rest:
            spot.feed(rest)
        while spot.received < size:
            n = sock.recv_into(view)
            if not n:
                break
            spot.feed(view[:n])
    elapsed = time.perf_counter() - start
    spot.check(size, f"GET {target}")
    return elapsed


def http_put_file(port: int, method: str, target: str, source: Path, multipart: bool) -> float:
    """Seconds from connect to the response of sending ``source`` as the body (as the
    ``file`` part of a multipart form, with ``multipart``); the response must be 2xx."""
    size = source.stat().st_size
    boundary = uuid.uuid4().hex
    before, after, kind = b"", b"", "application/octet-stream"
    if multipart:
        before = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="blob"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        after = f"\r\n--{boundary}--\r\n".encode()
        kind = f"multipart/form-data; boundary={boundary}"
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {len(before) + size + len(after)}\r\n\r\n"
    ).encode()
    buf = bytearray(65536)
    start = time.perf_counter()
    with _connect(port) as sock, open(source, "rb") as f:
        sock.sendall(head + before)
        sock.sendfile(f)
        sock.sendall(after)
        status, _, _ = _read_head(sock, buf)
    elapsed = time.perf_counter() - start
    if not 200 <= status < 300:
        raise AssertionError(f"{method} {target}: {status}")
    return elapsed


@contextlib.contextmanager
def _nginx(root: Path) -> Iterator[Server | None]:
    """nginx serving ``root`` (None when it is not installed)."""
    if nginx_path() is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as prefix:
        server = start_nginx(prefix, str(root))
        try:
            yield server
        finally:
            server.stop()


async def files(bench: Bench, sandboxd: Server) -> None:
    """A 1 GiB download and upload (16 MiB in quick mode) in MB/s; nginx serves the same
    file to the same client (``sendfile``) and takes a PUT of it (the dav module)."""
    size = 16 * MiB if bench.quick else GiB
    runs = 1 if bench.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-files-") as directory:
        root = Path(directory)
        (root / "put").mkdir()
        os.chmod(root, 0o755)  # nginx's worker runs as nobody
        os.chmod(root / "put", 0o777)
        source = root / "blob.bin"
        await asyncio.to_thread(_make_file, source, size)
        crc = _crc_of_pattern(size)
        down: dict[str, list[float]] = {"sandboxd": [], "nginx": []}
        up: dict[str, list[float]] = {"sandboxd": [], "nginx": []}
        with _nginx(root) as nginx:
            for _ in range(runs):  # interleaved: the machine's drift hits both alike
                target = f"/download?path={source}"
                seconds = await asyncio.to_thread(http_get, sandboxd.port, target, size)
                down["sandboxd"].append(size / seconds / 1e6)
                written = root / "uploaded.bin"
                seconds = await asyncio.to_thread(
                    http_put_file, sandboxd.port, "POST", f"/upload?path={written}", source, True
                )
                up["sandboxd"].append(size / seconds / 1e6)
                await asyncio.to_thread(_check_and_remove, written, size, crc)
                if nginx is None:
                    continue
                seconds = await asyncio.to_thread(http_get, nginx.port, "/blob.bin", size)
                down["nginx"].append(size / seconds / 1e6)
                seconds = await asyncio.to_thread(
                    http_put_file, nginx.port, "PUT", "/put/blob.bin", source, False
                )
                up["nginx"].append(size / seconds / 1e6)
                await asyncio.to_thread(_check_and_remove, root / "put" / "blob.bin", size, crc)
    label = f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"
    entry: dict[str, object] = {"bytes": size}
    for name, rates, what in (("download", down, "GET"), ("upload", up, "PUT (dav)")):
        ours = stat(rates["sandboxd"])
        theirs = stat(rates["nginx"]) if rates["nginx"] else None
        entry[f"{name}_sandboxd_MBps"] = ours
        entry[f"{name}_nginx_MBps"] = theirs
        anchor = f"nginx {what}" if theirs else "(nginx not installed)"
        bench.row(f"{name} {label}", "MB/s", ours, theirs, "higher is better", anchor=anchor)
    bench.results["files"] = entry


def _check_and_remove(path: Path, size: int, crc: int) -> None:
    try:
        if path.stat().st_size != size or _file_crc(path) != crc:
            raise AssertionError(f"{path}: the uploaded file is not what was sent")
    finally:
        path.unlink(missing_ok=True)


# ---- /tunnel beside a direct loopback copy --------------------------------------------


class Endpoints:
    """Two loopback listeners, each serving its connections one at a time: a sink that
    reads to EOF and reports what arrived and when the last of it did, and a source that
    sends ``size`` bytes of the pattern and closes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sunk: queue.Queue[tuple[Spot, float]] = queue.Queue()
        self.sink = self._listen(self._sink)
        self.source = self._listen(self._source)

    def _listen(self, serve: Callable[[socket.socket], None]) -> socket.socket:
        listener = socket.create_server(("127.0.0.1", 0))

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # closed
                with conn:
                    serve(conn)

        threading.Thread(target=loop, daemon=True).start()
        return listener

    @staticmethod
    def port(listener: socket.socket) -> int:
        return int(listener.getsockname()[1])

    def _sink(self, conn: socket.socket) -> None:
        view = memoryview(bytearray(MiB))
        spot = Spot()
        while n := conn.recv_into(view):
            spot.feed(view[:n])
        self.sunk.put((spot, time.perf_counter()))

    def _source(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            _send_pattern(conn, self.size)

    def close(self) -> None:
        for listener in (self.sink, self.source):
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()


def _send_pattern(sock: socket.socket, size: int) -> None:
    view = memoryview(BLOCK)
    for start in range(0, size, MiB):
        sock.sendall(view[: min(MiB, size - start)])
    sock.shutdown(socket.SHUT_WR)


def upstream(port: int, endpoints: Endpoints) -> float:
    """Seconds from connect until the sink has all ``size`` bytes sent to ``port``."""
    start = time.perf_counter()
    with _connect(port) as sock:
        _send_pattern(sock, endpoints.size)
        spot, when = endpoints.sunk.get(timeout=600)
    spot.check(endpoints.size, "upstream (at the sink)")
    return when - start


def downstream(port: int, size: int) -> float:
    """Seconds from connect to EOF of reading the source's ``size`` bytes from ``port``."""
    view = memoryview(bytearray(MiB))
    spot = Spot()
    start = time.perf_counter()
    with _connect(port) as sock:
        while n := sock.recv_into(view):
            spot.feed(view[:n])
    elapsed = time.perf_counter() - start
    spot.check(size, "downstream")
    return elapsed


def _start_forwarder(
    sandboxd: Server, remotes: list[int]
) -> tuple[subprocess.Popen[str], list[int]]:
    """``sandboxd port-forward`` (client/forward.py) from free local ports to ``remotes``."""
    script = Path(sys.executable).parent / "sandboxd"
    program = [str(script)] if script.exists() else [sys.executable, "-m", "sandboxd"]
    env = {**os.environ, "SANDBOXD_URL": f"http://127.0.0.1:{sandboxd.port}"}
    proc = subprocess.Popen(
        [*program, "port-forward", *(f"0:{port}" for port in remotes)],
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    local = []
    for _ in remotes:  # "Forwarding from 127.0.0.1:LOCAL -> REMOTE"
        line = proc.stdout.readline()
        if not line.startswith("Forwarding from"):
            proc.kill()
            raise RuntimeError(f"port-forward did not start: {line!r}")
        local.append(int(line.split()[2].rpartition(":")[2]))
    return proc, local


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def tunnel(bench: Bench, sandboxd: Server) -> None:
    """MB/s each way through ``/tunnel`` (the CLI's ``port-forward`` as its client) to a
    loopback sink/source, beside the same copy straight over loopback TCP."""
    size = 16 * MiB if bench.quick else 256 * MiB
    runs = 1 if bench.quick else 3
    endpoints = Endpoints(size)
    forwarder = None
    rates: dict[str, list[float]] = {k: [] for k in ("up", "up_direct", "down", "down_direct")}
    try:
        sink, source = endpoints.port(endpoints.sink), endpoints.port(endpoints.source)
        forwarder, (via_sink, via_source) = await asyncio.to_thread(
            _start_forwarder, sandboxd, [sink, source]
        )
        cpu = {"sandboxd": sandboxd.cpu_seconds(), "forwarder": _cpu(forwarder.pid)}
        for _ in range(runs):
            for key, port in (("up", via_sink), ("up_direct", sink)):
                seconds = await asyncio.to_thread(upstream, port, endpoints)
                rates[key].append(size / seconds / 1e6)
            for key, port in (("down", via_source), ("down_direct", source)):
                seconds = await asyncio.to_thread(downstream, port, size)
                rates[key].append(size / seconds / 1e6)
        # Where the tunnel's time goes: CPU seconds per GB carried, both ways together.
        carried = 2 * runs * size / 1e9
        cpu["sandboxd"] = (sandboxd.cpu_seconds() - cpu["sandboxd"]) / carried
        cpu["forwarder"] = (_cpu(forwarder.pid) - cpu["forwarder"]) / carried
    finally:
        endpoints.close()
        if forwarder is not None:
            forwarder.send_signal(signal.SIGTERM)
            try:
                forwarder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                forwarder.kill()
                forwarder.wait()
    summaries = {key: stat(values) for key, values in rates.items()}
    bench.results["tunnel"] = {
        "bytes": size,
        **{f"{k}_MBps": v for k, v in summaries.items()},
        **{f"{k}_cpu_s_per_GB": v for k, v in cpu.items()},
    }
    label = f"{size // MiB} MiB"
    for way, key in (("client -> sandbox", "up"), ("sandbox -> client", "down")):
        bench.row(
            f"tunnel {label} {way}",
            "MB/s",
            summaries[key],
            summaries[f"{key}_direct"],
            "higher is better",
            anchor="direct TCP",
        )
    for who, name in (("sandboxd", "sandboxd"), ("forwarder", "`sandboxd port-forward`")):
        bench.row(f"tunnel: {name} CPU per GB carried", "s", stat([cpu[who]]), None, "")
