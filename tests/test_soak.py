"""Soak (issue 6, item 7): many commands of every kind — run to the end, dropped early by
the client, killed, timed out, under a PTY — and afterwards the daemon holds what it held
before: open fds, threads and RSS within 10 % of a warmed-up baseline, no zombie, no
child left.

``make test`` runs a short version; ``make soak`` the full one (10,000 commands), with
``SOAK_COMMANDS`` in the environment. The numbers are printed (``-s``).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator

import psutil
import pytest
import trio

from tests.helpers import command_processes, exec_socket, http_request
from tests.sdk.conftest import DaemonProcess, daemon_process

COMMANDS = int(os.environ.get("SOAK_COMMANDS", "600"))
WARM_UP = 300
CONCURRENCY = 40
SEED = int(os.environ.get("SOAK_SEED", str(random.randrange(1 << 32))))
KINDS = ["run", "run", "pty", "drop", "drop_kill_on_disconnect", "kill", "timeout"]


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with daemon_process("--home", "/tmp", "--stop-grace", "1") as running:
        yield running


async def one_command(ws_url: str, kind: str, rng: random.Random) -> str:
    """Run one command of ``kind``; returns how it ended, as the client saw it."""
    frame: dict[str, object] = {"type": "execute", "ttl_seconds": 0, "idle_timeout_seconds": 5}
    match kind:
        case "run":
            frame["command"] = f"head -c {rng.randrange(1, 200_000)} /dev/zero | tr '\\0' x"
        case "pty":
            frame |= {"command": "tty; printf 'line\\n%.0s' 1 2 3", "pty": True}
        case "drop" | "drop_kill_on_disconnect":
            frame["command"] = "echo hi; sleep 0.3; seq 1 20000"
            frame["kill_on_disconnect"] = kind == "drop_kill_on_disconnect"
        case "kill":
            frame["command"] = "sleep 30 & sleep 30"
        case "timeout":
            frame |= {"command": "sleep 30", "timeout_seconds": 1}
    async with exec_socket(ws_url) as client:
        await client.send(**frame)
        await client.recv_until("started")
        if kind.startswith("drop"):
            await client.recv_until("stdout")
            await client.stream.aclose()  # no close handshake
            return "dropped"
        if kind == "kill":
            await client.send(type="kill")
        t = await client.collect()
    terminal = t.terminal
    return str(terminal.get("exit_code", terminal.get("error_type")))


def measure(process: psutil.Process) -> dict[str, int]:
    return {
        "fds": process.num_fds(),
        "threads": process.num_threads(),
        "rss": process.memory_info().rss,
    }


async def run_many(ws_url: str, count: int, rng: random.Random) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(kind: str) -> None:
        async with limiter:
            outcomes[f"{kind}:{await one_command(ws_url, kind, rng)}"] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one, rng.choice(KINDS))
    return outcomes


async def sessions_gone(address: str) -> None:
    """Wait until every session has ended and expired (ttl 0)."""
    while (await http_request(address, "GET", "/healthz")).json()["sessions"]:
        await trio.sleep(0.2)


async def settle(
    process: psutil.Process, baseline: dict[str, int], deadline: float
) -> dict[str, int]:
    """Wait (idle threads and expired sessions go by themselves) until every measure is
    within 10 % of the baseline or the deadline passes; the last measures."""
    while True:
        now = measure(process)
        if all(now[k] <= baseline[k] * 1.1 for k in now) or trio.current_time() > deadline:
            return now
        await trio.sleep(0.5)


async def test_many_commands_of_every_kind_leave_no_trace(daemon: DaemonProcess) -> None:
    rng = random.Random(SEED)
    process = psutil.Process(daemon.process.pid)
    ws_url = f"ws://{daemon.address}/execute/ws"
    with trio.fail_after(120 + COMMANDS * 0.1):
        await run_many(ws_url, WARM_UP, rng)
        await sessions_gone(daemon.address)
        baseline = measure(process)
        started = time.monotonic()
        outcomes = await run_many(ws_url, COMMANDS, rng)
        elapsed = time.monotonic() - started
        await sessions_gone(daemon.address)
        after = await settle(process, baseline, trio.current_time() + 15)
        children = command_processes(process, recursive=True)
    print(f"\nsoak seed {SEED}: {COMMANDS} commands in {elapsed:.1f} s")
    print(f"baseline {baseline}\nafter    {after}\noutcomes {sorted(outcomes.items())}")
    assert children == [], [(c.pid, c.name(), c.status()) for c in children]
    for key in ("fds", "threads", "rss"):
        assert after[key] <= baseline[key] * 1.1, (key, baseline, after)
    assert sum(outcomes.values()) == COMMANDS
    for outcome, n in outcomes.items():
        kind, _, ended = outcome.partition(":")
        expected = {"run": "0", "pty": "0", "kill": "137", "timeout": "CommandTimeout"}
        assert ended == expected.get(kind, "dropped"), (outcome, n)
