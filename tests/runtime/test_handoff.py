"""SSE readers kept between two responses, on virtual time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import trio

from sandboxd.core.session import Attachment
from sandboxd.runtime.handoff import Handoffs

if TYPE_CHECKING:
    from sandboxd.runtime.supervisor import LiveSession


@dataclass
class FakeLive:
    command_id: str


async def test_a_resume_at_exactly_the_acked_offsets_takes_the_reader_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    detached: list[tuple[Attachment, float]] = []
    live = cast("LiveSession", FakeLive("c1"))
    async with trio.open_nursery() as nursery:
        handoffs = Handoffs(lambda _, a, at: detached.append((a, at)), nursery, 5.0)
        reader = Attachment(stdout_cursor=100, stderr_cursor=7, last_progress=0.0)
        handoffs.hand_over(live, reader)
        assert handoffs.take_over("c1", 100, 8) is None
        assert handoffs.take_over("c2", 100, 7) is None
        await trio.sleep(4.9)
        assert handoffs.take_over("c1", 100, 7) == (live, reader)
        assert handoffs.take_over("c1", 100, 7) is None  # taken once
        await trio.sleep(10)
    assert detached == [] and len(handoffs) == 0


async def test_a_reader_that_does_not_resume_is_detached_as_of_its_response_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    detached: list[tuple[Attachment, float, float]] = []
    live = cast("LiveSession", FakeLive("c1"))
    async with trio.open_nursery() as nursery:
        handoffs = Handoffs(
            lambda _, a, at: detached.append((a, at, trio.current_time())), nursery, 5.0
        )
        first = Attachment(stdout_cursor=10, stderr_cursor=0, last_progress=0.0)
        second = Attachment(stdout_cursor=10, stderr_cursor=0, last_progress=0.0)
        ended = trio.current_time()
        handoffs.hand_over(live, first)
        handoffs.hand_over(live, second)
        assert handoffs.take_over("c1", 10, 0) == (live, first)
        await trio.sleep(4.99)
        assert detached == []
        await trio.sleep(1)
        assert detached == [(second, ended, ended + 5)]
    assert len(handoffs) == 0
