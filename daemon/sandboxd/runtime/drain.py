"""The bounded drain after a command's leader exits.

A child the command left behind (``sleep 100 &``) may hold its output pipe open, so after
the leader is reaped each output pump may go on reading for at most ``--drain-seconds``
before the session finishes without that child's EOF. Only time spent reading or waiting
on the fd counts: time a pump is held back by pacing (output waiting for an attached or
lingering client) does not, or output the leader wrote before it exited would be lost
for a slow client. Pacing itself is bounded by the stall rules.
"""

from __future__ import annotations

import math

import trio


class DrainClock:
    """One output pump's drain budget: ``scope`` is cancelled once it is spent."""

    def __init__(self, budget: float, reaped: bool) -> None:
        self.scope = trio.CancelScope()
        self._budget = budget
        self._reaped = False
        self._paced = False
        self._since = 0.0
        if reaped:
            self.leader_reaped()

    def leader_reaped(self) -> None:
        """The leader exited: from now on, unpaced time is counted."""
        if not self._reaped:
            self._reaped = True
            if not self._paced:
                self._count_from_now()

    def paced(self, held: bool) -> None:
        """The pump is (``held``) or is no longer held back by pacing."""
        if held == self._paced:
            return
        self._paced = held
        if not self._reaped:
            return
        if held:
            self._budget -= trio.current_time() - self._since
            self.scope.deadline = math.inf
        else:
            self._count_from_now()

    def _count_from_now(self) -> None:
        self._since = trio.current_time()
        self.scope.deadline = self._since + self._budget
