"""SSE readers between two responses (protocol.md §3).

An SSE response that ends with ``ack_required`` is followed at once by the client's
resume from the offsets it names. Meanwhile its attachment is kept (it still paces the
command and keeps the output it has not read), so a resume at exactly those offsets
carries on as the same reader, even when the session's TTL ran out in between (with
``ttl_seconds: 0`` it runs out the moment the command finishes). An attachment not taken
over within ``patience`` seconds is detached, as of the moment its response ended.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from sandboxd.core.session import Attachment

if TYPE_CHECKING:
    from sandboxd.runtime.live import LiveSession


@dataclass(eq=False, slots=True)
class _Handoff:
    live: LiveSession
    attachment: Attachment
    since: float


class Handoffs:
    """The attachments of SSE readers waiting for their resume."""

    def __init__(
        self,
        detach: Callable[[LiveSession, Attachment, float], None],
        nursery: trio.Nursery,
        patience: float,
    ) -> None:
        self._detach = detach
        self._nursery = nursery
        self._patience = patience
        self._waiting: list[_Handoff] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def hand_over(self, live: LiveSession, attachment: Attachment) -> None:
        """The response of ``attachment`` ended with ``ack_required``: keep it for a resume."""
        handoff = _Handoff(live, attachment, trio.current_time())
        self._waiting.append(handoff)
        self._nursery.start_soon(self._give_up, handoff)

    def take_over(
        self, command_id: str, stdout_offset: int, stderr_offset: int
    ) -> tuple[LiveSession, Attachment] | None:
        """The waiting reader of ``command_id`` at exactly these offsets, if there is one."""
        for handoff in self._waiting:
            attachment = handoff.attachment
            if (
                handoff.live.command_id == command_id
                and attachment.stdout_cursor == stdout_offset
                and attachment.stderr_cursor == stderr_offset
            ):
                self._waiting.remove(handoff)
                return handoff.live, attachment
        return None

    async def _give_up(self, handoff: _Handoff) -> None:
        await trio.sleep_until(handoff.since + self._patience)
        if handoff in self._waiting:
            self._waiting.remove(handoff)
            self._detach(handoff.live, handoff.attachment, handoff.since)
