"""The drain budget after a leader exits counts only time not held back by pacing
(virtual time)."""

from __future__ import annotations

import math

import trio
import trio.testing

from sandboxd.runtime.drain import DrainClock


async def test_the_budget_starts_at_the_reap_and_pauses_while_paced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = DrainClock(1.0, reaped=False)
    assert clock.scope.deadline == math.inf  # running: no drain yet
    await trio.sleep(10)
    clock.leader_reaped()
    start = trio.current_time()
    assert clock.scope.deadline == start + 1.0
    await trio.sleep(0.25)
    clock.paced(True)  # held back by a slow or lingering client: the clock stops
    assert clock.scope.deadline == math.inf
    await trio.sleep(30)
    clock.paced(False)  # 0.75 s of the budget are left, from now
    assert clock.scope.deadline == trio.current_time() + 0.75


async def test_a_pump_paced_at_the_reap_starts_counting_when_pacing_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = DrainClock(0.5, reaped=False)
    clock.paced(True)
    clock.leader_reaped()
    assert clock.scope.deadline == math.inf
    await trio.sleep(5)
    clock.paced(False)
    assert clock.scope.deadline == trio.current_time() + 0.5


async def test_a_pump_started_after_the_reap_counts_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = DrainClock(0.5, reaped=True)
    assert clock.scope.deadline == trio.current_time() + 0.5
    clock.leader_reaped()  # a second notice changes nothing
    assert clock.scope.deadline == trio.current_time() + 0.5
