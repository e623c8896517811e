"""Live upgrade (issue 11): timers cross an upgrade as remaining durations.

A command timeout, an idle timeout and a TTL whose deadlines fall after an upgrade fire at
their original deadlines. The swap is made long on purpose (the ``exec-window-sleep=1``
fault hook holds the exec for a second), so a timer restarted from its full length, or one
that forgot to subtract the swap, misses by a second or more.

Tolerance: 100 ms early, 100 ms + 300 ms late (the slack of a loaded 2-core machine: the
daemon's reap, the poll of /sessions and the client's read all add scheduling delay).

``kill_on_disconnect`` with its only client closed by the upgrade gives that client
``--upgrade-grace`` (3 s here) to come back: a client that does keeps its command; the
command of one that does not is killed when the grace is over.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from tests.helpers import exec_socket
from tests.upgrade_clients import (
    Follower,
)
from tests.upgrade_helpers import (
    Command,
    loop_command,
    post_upgrade,
    session,
    upgrade_daemon,
    wait_generation,
)

EARLY = 0.1
LATE = 0.1 + 0.3
GRACE = 3.0
#: Long enough that every deadline falls after the new image is up, even when the swap
#: (pre-flight, the 1 s exec-window sleep, start-up) takes 4 s on a loaded machine: a
#: deadline inside the swap can only fire once the new image runs.
TIMEOUT, IDLE, TTL = 10, 9, 9


async def _thread(function: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(function, *args)


def _on_time(name: str, fired: float, deadline: float) -> str | None:
    miss = fired - deadline
    if -EARLY <= miss <= LATE:
        return None
    return f"{name} fired {miss:+.3f} s from its deadline"


async def _until_ended(address: str, command_id: str) -> dict[str, Any]:
    """Poll /sessions until ``command_id`` has ended; its row."""
    while True:
        row = await _thread(session, address, command_id)
        assert row is not None, command_id
        if row["ended_at"] is not None:
            return row
        await trio.sleep(0.02)


async def _until_gone(address: str, command_id: str) -> float:
    """Poll /sessions until ``command_id`` is gone; time.time() when first seen gone."""
    while await _thread(session, address, command_id) is not None:
        await trio.sleep(0.02)
    return time.time()


async def test_timeout_idle_and_ttl_fire_at_their_original_deadlines_across_an_upgrade() -> None:
    with upgrade_daemon(fault="exec-window-sleep=1") as daemon, trio.fail_after(60):
        ws_url = f"ws://{daemon.address}/execute/ws"
        timed = Follower(ws_url, Command("timeout", "sleep 30", 0), {"timeout_seconds": TIMEOUT})
        async with trio.open_nursery() as nursery:
            await nursery.start(timed.run)
            # idle: the only client leaves before the upgrade, so no grace applies
            async with exec_socket(ws_url) as idle_client:
                started = await idle_client.start(command="sleep 30", idle_timeout_seconds=IDLE)
            idle_id, idle_left = started["command_id"], time.time()
            # ttl: a command that is over at once
            async with exec_socket(ws_url) as ttl_client:
                started = await ttl_client.start(command="true", ttl_seconds=TTL, close_stdin=True)
                assert (await ttl_client.recv_until("exit"))["exit_code"] == 0
            ttl_id = started["command_id"]
            ended = await _thread(session, daemon.address, ttl_id)
            assert ended is not None and ended["ended_at"] is not None
            await trio.sleep(0.8)
            status, body = await _thread(post_upgrade, daemon.address)
            assert status == 202, body
            idle_row, ttl_gone = await _both(
                _until_ended(daemon.address, idle_id), _until_gone(daemon.address, ttl_id)
            )
        health = await _thread(wait_generation, daemon.address, 1)
        assert timed.command_id is not None
        timed_row = await _thread(session, daemon.address, timed.command_id)
    print(f"\nswap_ms {health['last_upgrade']['swap_ms']}")
    # (under heavy load a pre-flight slower than the timers would let them fire first)
    assert timed.closes == [1001], f"the upgrade did not straddle the timers: {timed.closes}"
    assert timed.terminal is not None and timed.terminal.get("error_type") == "CommandTimeout"
    misses = [
        _on_time("timeout", timed.ended_at, timed.started_at + TIMEOUT),
        _on_time("idle timeout", idle_row["ended_at"], idle_left + IDLE),
        _on_time("ttl", ttl_gone, ended["ended_at"] + TTL),
    ]
    # (the daemon's own view of the timeout: its session's start and end, wall clock)
    assert timed_row is not None
    daemon_view = timed_row["ended_at"] - timed_row["started_at"]
    assert [m for m in misses if m] == [], (misses, f"daemon: timeout after {daemon_view:.3f} s")


async def _both(first: Any, second: Any) -> tuple[Any, Any]:
    results: list[Any] = [None, None]

    async def one(i: int, awaitable: Any) -> None:
        results[i] = await awaitable

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0, first)
        nursery.start_soon(one, 1, second)
    return results[0], results[1]


async def test_kill_on_disconnect_waits_the_upgrade_grace_for_its_client(tmp_path: Any) -> None:
    grace = ("--upgrade-grace", str(GRACE))
    with upgrade_daemon(*grace) as daemon, trio.fail_after(60):
        ws_url = f"ws://{daemon.address}/execute/ws"
        # comes back at once (the follower reattaches when it is closed)
        returns = Follower(
            ws_url, loop_command("k", tmp_path / "stop"), {"kill_on_disconnect": True}
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(returns.run)
            # never comes back: it reads until the upgrade closes it, then stays away
            async with exec_socket(ws_url) as gone_client:
                started = await gone_client.start(command="sleep 30", kill_on_disconnect=True)
                gone_id = started["command_id"]
                status, body = await _thread(post_upgrade, daemon.address)
                assert status == 202, body
                closed = await gone_client.collect()
            closed_at = time.time()  # the grace starts here at the earliest
            assert closed.close_code == 1001
            await _thread(wait_generation, daemon.address, 1)
            resumed = time.time()
            await trio.sleep(max(0.0, closed_at + GRACE - 0.5 - time.time()))
            row = await _thread(session, daemon.address, gone_id)
            assert row is not None and row["ended_at"] is None, (
                f"killed inside the grace: closed {closed_at:.3f}, resumed {resumed:.3f}, {row}"
            )
            gone_row = await _until_ended(daemon.address, gone_id)
            await trio.sleep(max(0.0, resumed + GRACE + 1 - time.time()))
            assert returns.command_id is not None
            row = await _thread(session, daemon.address, returns.command_id)
            assert row is not None and row["ended_at"] is None, "a client that came back lost it"
            # back to the normal rule: its client leaves now, and the command is killed
            nursery.cancel_scope.cancel()
        left = time.time()
        row = await _until_ended(daemon.address, returns.command_id)
    assert returns.closes == [1001], returns.closes
    assert closed_at + GRACE - 0.5 <= gone_row["ended_at"] <= resumed + GRACE + 1.5, (
        gone_row,
        closed_at,
        resumed,
    )
    assert row["ended_at"] - left <= 1.5, (row, left)
