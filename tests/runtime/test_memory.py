"""glibc heap settings: the arena cap applies, and the heap is trimmed only after work."""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing

from sandboxd.runtime import memory


def test_the_arena_cap_is_accepted_by_glibc() -> None:
    # (What trimming gives back is measured by test_soak.py's RSS check.)
    assert memory.limit_malloc_arenas(2) is True


async def test_the_heap_is_trimmed_every_interval_only_after_commands_ran(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    trims: list[float] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(trio.current_time()))
    started = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory.keep_trimmed, lambda: started[0], 10.0)
        await trio.sleep(25)  # idle: no trim at 10 or 20
        started[0] = 3
        await trio.sleep(10)  # trimmed at 30
        await trio.sleep(20)  # nothing new: none at 40, 50
        nursery.cancel_scope.cancel()
    assert trims == [30.0]


def test_settle_gc_freezes_what_exists_collects_the_young_less_often_and_enables_it() -> None:
    threshold = gc.get_threshold()
    gc.disable()  # (as the entry point leaves it while the daemon's modules import)
    try:
        memory.settle_gc()
        assert gc.get_freeze_count() > 0  # start-up's objects: out of every collection
        assert gc.get_threshold() == (memory.GC_YOUNG_THRESHOLD, *threshold[1:])
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*threshold)
