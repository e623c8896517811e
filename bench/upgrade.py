"""The ``upgrade`` workload of ``make bench`` (issue 11): live upgrades under attached clients.

A fresh sandboxd runs ten commands, each followed by a client that reattaches at once by
``command_id`` at its offsets when an upgrade closes it (1001): one fast stream (a bash
counter, about 20,000 lines a second) and nine slow ones (a line every 50 ms). Upgrades are
triggered one after another, alternately by SIGUSR2 and ``POST /admin/upgrade``. Measured:

* trigger -> new image accepting: from the trigger until the first ``/healthz`` answer with
  the new generation (polled every 5 ms; requests sent during the swap wait in the carried
  listening socket's backlog, so the first one the new image serves marks its start);
* the stream gap: sandboxd does not expose when its old image read its last byte and the
  new one its first, so this is measured from the client side: the longest pause in the
  fast stream's arrival around each upgrade (it includes the reattach, so it is an upper
  bound of the daemon's own read gap);
* the daemon's own ``last_upgrade.swap_ms``.

Verified: zero refused connections (a raw connect every 5 ms across every swap), and each
stream's lines are consecutive numbers from 0 at contiguous offsets (zero lost or
duplicated bytes).
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

SLOW = 9


def _health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
        body: dict[str, Any] = json.load(r)
    return body


def _post_upgrade(port: int) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/upgrade", data=b"", method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@dataclass
class Stream:
    """One followed command: its lines must be 0, 1, 2, ... at contiguous offsets."""

    command: str
    command_id: str = ""
    offset: int = 0
    next_line: int = 0
    partial: bytes = b""
    errors: list[str] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes)
    closes: int = 0
    done: bool = False
    track: bool = False

    def take(self, data: bytes, offset: int) -> None:
        if offset != self.offset:
            self.errors.append(f"offset {offset}, want {self.offset}")
        self.offset = offset + len(data)
        if self.track:
            self.arrivals.append((time.perf_counter(), len(data)))
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line != str(self.next_line).encode():
                self.errors.append(f"line {line[:20]!r}, want {self.next_line}")
                self.next_line = int(line) if line.isdigit() else self.next_line
            self.next_line += 1


async def follow(port: int, stream: Stream, started: asyncio.Event) -> None:
    """Run ``stream.command`` and follow it until it ends, reattaching after each close."""
    url = f"ws://127.0.0.1:{port}/execute/ws"
    options: dict[str, Any] = {"compression": None, "max_size": None, "open_timeout": 60}
    while not stream.done:
        try:
            async with connect(url, **options) as ws:
                if not stream.command_id:
                    frame: dict[str, Any] = {
                        "type": "execute",
                        "command": stream.command,
                        "close_stdin": True,
                        "timeout_seconds": 0,
                    }
                else:
                    frame = {
                        "type": "reconnect",
                        "command_id": stream.command_id,
                        "stdout_offset": stream.offset,
                        "stderr_offset": 0,
                    }
                await ws.send(json.dumps(frame))
                async for message in ws:
                    msg = json.loads(message)
                    if msg["type"] == "started":
                        stream.command_id = msg["command_id"]
                        started.set()
                    elif msg["type"] == "stdout":
                        stream.take(msg["data"].encode(), msg["offset"])
                    elif msg["type"] in ("exit", "error"):
                        stream.done = True
                        return
                stream.closes += 1
        except ConnectionClosed:
            stream.closes += 1
        except OSError:
            await asyncio.sleep(0.01)  # (a refused connect is counted by the probe)


class Probe:
    """A raw TCP connect every 5 ms, in a thread; ``refused`` must stay 0."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.attempts = 0
        self.refused = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.005):
            self.attempts += 1
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30):
                    pass
            except ConnectionRefusedError:
                self.refused += 1
            except OSError:
                pass


#: /healthz polls the swap cut after they were sent (must stay empty).
CUT_REQUESTS: list[str] = []


def _wait_generation(port: int, generation: int, since: float) -> float:
    """Seconds from ``since`` to the first /healthz showing ``generation``."""
    while True:
        try:
            health = _health(port)
        except (OSError, http.client.HTTPException) as error:
            CUT_REQUESTS.append(repr(error))
            time.sleep(0.005)
            continue
        last = health.get("last_upgrade") or {}
        if last.get("result") not in (None, "ok"):
            raise AssertionError(f"upgrade {generation}: {last}")
        if health["generation"] >= generation:
            return time.perf_counter() - since
        time.sleep(0.005)


def _gap(stream: Stream, t0: float, t1: float) -> float:
    """The longest pause between two arrivals of ``stream`` in [t0, t1]."""
    times = [t for t, _ in stream.arrivals if t0 <= t <= t1]
    return max((b - a for a, b in itertools.pairwise(times)), default=t1 - t0)


async def run_upgrades(port: int, pid: int, upgrades: int) -> dict[str, Any]:
    """The workload on the sandboxd at ``port`` (process ``pid``)."""
    # (paced to ~20,000 lines/s: a counter printing as fast as it can would take a whole
    # core of the two, and the swap would measure CPU contention, not the daemon)
    fast = Stream(
        "i=0; while :; do echo $i; i=$((i+1)); [ $((i % 200)) = 0 ] && sleep 0.01; done",
        track=True,
    )
    slow = [Stream("i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done") for _ in range(SLOW)]
    streams = [fast, *slow]
    events = [asyncio.Event() for _ in streams]
    tasks = [asyncio.create_task(follow(port, s, e)) for s, e in zip(streams, events, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    probe = Probe(port)
    accept_ms: list[float] = []
    gap_ms: list[float] = []
    swap_ms: list[float] = []
    try:
        for n in range(1, upgrades + 1):
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            if n % 2:
                os.kill(pid, signal.SIGUSR2)
            else:
                status = await asyncio.to_thread(_post_upgrade, port)
                if status != 202:
                    raise AssertionError(f"upgrade {n}: POST answered {status}")
            accept_ms.append(await asyncio.to_thread(_wait_generation, port, n, t0) * 1000)
            health = await asyncio.to_thread(_health, port)
            swap_ms.append(float(health["last_upgrade"]["swap_ms"] or 0.0))
            if health["pid"] != pid:
                raise AssertionError(f"pid changed: {health}")
            await asyncio.sleep(0.2)  # the fast stream flows again before the gap is read
            gap_ms.append(_gap(fast, t0, time.perf_counter()) * 1000)
    finally:
        probe.stop.set()
        probe.thread.join()
        for stream in streams:
            stream.done = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    errors = [e for s in streams for e in s.errors]
    closes = sum(s.closes for s in streams)
    return {
        "upgrades": upgrades,
        "accept_ms": accept_ms,
        "gap_ms": gap_ms,
        "swap_ms": swap_ms,
        "refused": probe.refused,
        "connects": probe.attempts,
        "stream_errors": errors[:10],
        "lost_or_duplicated": len(errors),
        "bytes": sum(s.offset for s in streams),
        "closes": closes,
        "cut_requests": CUT_REQUESTS[:10],
    }
