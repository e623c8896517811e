"""Chaos (issue 6, item 6): a stream of distinct content whose client connection is cut
at random points, by clean closes and by TCP resets, while the released Python SDK reads
it; its automatic reconnect must reassemble every byte exactly once.

``make test`` runs a short version (24 MB, 8 cuts); ``make soak`` the full one (100 MB,
100 cuts). ``CHAOS_MB`` and ``CHAOS_CUTS`` set the size, ``CHAOS_SEED`` replays a run (the
seed is printed). Half of the cuts are clean closes and half resets, in a seeded order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import trio

from tests.sdk.conftest import DaemonProcess, daemon_process, sdk_sandbox

pytestmark = pytest.mark.sdk

MEGABYTES = int(os.environ.get("CHAOS_MB", "24"))  # > 8 cuts x 2 MiB: every cut happens
CUTS = int(os.environ.get("CHAOS_CUTS", "8"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.randrange(1 << 32))))
RING = 4 * 1024 * 1024
KiB = 1024


@dataclass
class CuttingProxy:
    """A TCP proxy in front of the daemon that cuts each of the first ``cuts``
    connections after a random number of bytes towards the client, half of them by a
    clean close and half by a reset, in an order shuffled by ``rng``."""

    target: tuple[str, int]
    cuts: int
    rng: random.Random
    address: str = ""
    done: list[tuple[str, int]] = field(default_factory=list)  # (how, after bytes)
    plan: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plan = ["close", "reset"] * (self.cuts // 2) + ["close"] * (self.cuts % 2)
        self.rng.shuffle(self.plan)

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(*self.target)
        try:
            await self._relay(client, upstream)
        finally:
            # (trio closes ``client``; a proxy cancelled at the test's end, while the last
            # connection is still being torn down, must close ``upstream`` too.)
            await trio.aclose_forcefully(upstream)

    async def _relay(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        cut_at: int | None = None
        how = "close"
        if len(self.done) < self.cuts:
            # past the upgrade and a few frames, so each attempt delivers data
            cut_at = self.rng.randrange(200 * KiB, 2 * 1024 * KiB)
            how = self.plan[len(self.done)]
        cut = False
        async with trio.open_nursery() as nursery:

            async def to_client() -> None:
                nonlocal cut
                sent = 0
                while data := await upstream.receive_some(64 * KiB):
                    if cut_at is not None and sent + len(data) >= cut_at:
                        await client.send_all(data[: cut_at - sent])
                        cut = True
                        break
                    await client.send_all(data)
                    sent += len(data)
                nursery.cancel_scope.cancel()

            async def to_upstream() -> None:
                while data := await client.receive_some(64 * KiB):
                    await upstream.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(_ends_quietly, to_client)
            nursery.start_soon(_ends_quietly, to_upstream)
        if cut:
            self.done.append((how, cut_at or 0))
            await _cut(how, client, upstream)
        else:
            await _cut("close", client, upstream)


async def _ends_quietly(pump: Callable[[], Awaitable[None]]) -> None:
    """A pump whose other side went away has simply ended."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await pump()


async def _cut(how: str, *streams: trio.SocketStream) -> None:
    """A clean close (FIN) or a reset (RST: linger 0), on both sides."""
    for stream in streams:
        if how == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(stream)


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    # A ring smaller than the stream: without pacing for the clients that were cut off,
    # the 0.5 s each SDK reconnect waits would let the command overwrite what they missed.
    with daemon_process(
        "--home", "/tmp", "--stop-grace", "1", "--ring-bytes", str(RING)
    ) as running:
        yield running


def _expected(lines: int) -> tuple[int, str]:
    out = subprocess.run(["seq", "1", str(lines)], capture_output=True, check=True).stdout
    return len(out), hashlib.sha256(out).hexdigest()


def _read_through_sdk(url: str, command: str) -> tuple[int, str, int | None]:
    handle = sdk_sandbox(url).run(command, wait=False, timeout=600)
    digest = hashlib.sha256()
    size = 0
    for chunk in handle:
        if chunk.stream == "stdout":
            data = chunk.data.encode()
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest(), handle.result.exit_code


async def test_random_cuts_lose_and_duplicate_nothing_through_the_sdk_reconnect(
    daemon: DaemonProcess,
) -> None:
    lines = MEGABYTES * 1_000_000 // 8  # `seq` writes about 8 bytes a line at these sizes
    size, digest = _expected(lines)
    host, port = daemon.address.rsplit(":", 1)
    proxy = CuttingProxy((host, int(port)), CUTS, random.Random(SEED))
    with trio.fail_after(60 + CUTS * 3 + MEGABYTES):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            got_size, got_digest, code = await trio.to_thread.run_sync(
                _read_through_sdk, f"http://{proxy.address}", f"seq 1 {lines}"
            )
            nursery.cancel_scope.cancel()
    print(f"seed {SEED}: {size} bytes, {len(proxy.done)} cuts: {proxy.done}")
    assert len(proxy.done) == CUTS, f"seed {SEED}: the stream ended before every cut"
    assert {how for how, _ in proxy.done} == {"close", "reset"} or CUTS < 2
    assert (got_size, got_digest) == (size, digest), f"seed {SEED}"
    assert code == 0
