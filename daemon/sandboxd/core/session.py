"""The command session as data: states, timers, attachments, and the effects they ask for.

Nothing here acts. Methods take ``now`` and return effects (``KillTree``, ``Expire``) that
the supervisor carries out. The rules:

* A session is RUNNING from spawn until its leader is reaped *and* its output is drained;
  then FINISHED; when its TTL runs out, EXPIRED (removed from the registry).

      RUNNING --finish--> FINISHED --expire--> EXPIRED

  Any other move raises ``IllegalTransition`` and changes nothing.
* ``timeout_seconds`` > 0 kills the command that long after it started (0 = no deadline).
* ``idle_timeout_seconds`` > 0 kills a command that has had no client attached for that
  long. The clock starts when the last client leaves and stops when one attaches. -1 and 0
  both mean never (0 as for ``timeout_seconds``: no limit).
* ``kill_on_disconnect`` kills the command when its last client leaves.
* A *watching* attachment (``reconnect`` with ``"watch": true``, a sandboxd extension)
  receives output exactly like a client and paces the command like one (a watcher that
  keeps up gets every byte), but it is not a client: attaching does not stop or reset the
  idle clock, leaving never starts it or triggers ``kill_on_disconnect``, and it may not
  write (``input``, ``close_stdin`` and ``resize`` are refused; ``signal`` and ``kill``
  are allowed). ``logs``, ``ps``, ``kill`` and read-only attaches watch.
* ``ttl_seconds`` >= 0 keeps a finished session that long after it finished (0: it goes at
  once, though clients already attached still read it to the end); -1 keeps it forever.
* After a live upgrade closed its clients (``begin_grace``), a session is in a *grace*:
  its clients leaving neither starts the idle clock nor triggers ``kill_on_disconnect``.
  A client attaching ends the grace (the normal rules apply from then on); if none came
  back when it runs out, the last client is taken to have left then.
* A kill asked for while one is already under way changes nothing: the first reason is
  the one reported.

Output is paced by clients (``may_read``): see ``PACE_WINDOW`` and ``LAG_LIMIT``, and
``Delivery`` for clients that acknowledge what they received.
"""

from __future__ import annotations

import math
import signal as signal_module
from dataclasses import dataclass, field
from enum import Enum

from sandboxd.core.messages import Error, Exit
from sandboxd.core.ringbuffer import ReadResult, RingBuffer

#: The child's output may run at most ``capacity // PACE_WINDOW`` bytes ahead of the slowest
#: pacing client. The rest of the ring keeps what was sent to a client but may still have
#: been in flight (socket buffers, proxies) when its connection dropped, so that client's
#: reconnect finds it.
PACE_WINDOW = 2
#: A client more than ``capacity // LAG_LIMIT`` bytes behind the leading client stops
#: pacing: a slow consumer never holds back a fast one (it may see a gap instead).
LAG_LIMIT = 4


class SessionState(Enum):
    """Where a session is in its life."""

    RUNNING = "running"
    FINISHED = "finished"
    EXPIRED = "expired"


class EndReason(Enum):
    """Why a command ended, as reported in the ``exit`` frame's ``reason``."""

    EXITED = "exited"
    KILLED = "killed"
    TIMEOUT = "timeout"
    IDLE = "idle"
    DISCONNECT = "disconnect"
    SHUTDOWN = "shutdown"


class Stream(Enum):
    """The two output streams of a command (a PTY command has only stdout)."""

    STDOUT = "stdout"
    STDERR = "stderr"


class IllegalTransition(Exception):
    """A state change the table does not allow."""


_TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (SessionState.RUNNING, "finish"): SessionState.FINISHED,
    (SessionState.FINISHED, "expire"): SessionState.EXPIRED,
}


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the command's leader process ended, as the reaper saw it."""

    code: int  # exit status, or 128+N for a death by signal N
    signal: int | None = None
    cpu_seconds: float = 0.0
    peak_rss_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Lifetimes:
    """The timer settings of one command (see the module docstring)."""

    timeout_seconds: int = 60
    idle_timeout_seconds: int = 300
    ttl_seconds: int = 600
    kill_on_disconnect: bool = False


@dataclass(frozen=True, slots=True)
class KillTree:
    """Effect: SIGKILL the command's process group and every descendant."""

    reason: EndReason


@dataclass(frozen=True, slots=True)
class Expire:
    """Effect: the session's TTL ran out; drop it from the registry."""


Effect = KillTree | Expire


@dataclass(eq=False, slots=True)
class Attachment:
    """One attached client: its own cursor in each stream.

    ``waiting`` is true while the client has taken everything and is parked until more
    output comes: it is ready, however long ago its ``last_progress`` was. ``watch`` marks
    a watching (read-only) attachment: see the module docstring.
    """

    stdout_cursor: int
    stderr_cursor: int
    last_progress: float
    waiting: bool = False
    watch: bool = False
    delivery: Delivery = field(default_factory=lambda: Delivery())

    def cursor(self, stream: Stream) -> int:
        """The next byte this client wants from ``stream``."""
        return self.stdout_cursor if stream is Stream.STDOUT else self.stderr_cursor

    def advance(self, stream: Stream, result: ReadResult, now: float) -> None:
        """Move past ``result``, which was just delivered."""
        end = result.offset + len(result.data)
        if stream is Stream.STDOUT:
            self.stdout_cursor = end
        else:
            self.stderr_cursor = end
        self.last_progress = now


@dataclass(eq=False)
class Session:
    """One command's session: its lifecycle, its output rings and its attached clients."""

    command_id: str
    pid: int
    lifetimes: Lifetimes
    stdout: RingBuffer
    stderr: RingBuffer
    started_at: float
    stall_seconds: float = 5.0
    state: SessionState = SessionState.RUNNING
    attachments: list[Attachment] = field(default_factory=list)
    watchers: list[Attachment] = field(default_factory=list)
    lingering: list[Attachment] = field(default_factory=list)
    idle_since: float | None = None
    kill_reason: EndReason | None = None
    status: ExitStatus | None = None
    end_reason: EndReason | None = None
    ended_at: float | None = None
    grace_until: float | None = None

    def __post_init__(self) -> None:
        if self.idle_since is None:
            self.idle_since = self.started_at

    # ---- transitions ------------------------------------------------------------

    def _move(self, event: str) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"{event!r} in state {self.state.name}") from None

    def finish(self, now: float, status: ExitStatus) -> list[Effect]:
        """The leader was reaped and the output drained: the session is finished."""
        self._move("finish")
        self.lingering.clear()  # no more output to pace
        self.status = status
        self.ended_at = now
        killed_by_us = self.kill_reason is not None and status.signal is not None
        self.end_reason = self.kill_reason if killed_by_us else EndReason.EXITED
        return self._expire_if_due(now)

    def request_kill(self, reason: EndReason) -> list[Effect]:
        """Kill the running command (a client's ``kill``, a shutdown); no-op otherwise."""
        if self.state is not SessionState.RUNNING or self.kill_reason is not None:
            return []
        self.kill_reason = reason
        return [KillTree(reason)]

    # ---- clients ----------------------------------------------------------------

    def attach(
        self, now: float, stdout_offset: int = 0, stderr_offset: int = 0, *, watch: bool = False
    ) -> Attachment:
        """A client attached; the idle clock stops. A watcher leaves the clock alone."""
        attachment = Attachment(stdout_offset, stderr_offset, now, watch=watch)
        attachment.delivery = Delivery(acked_stdout=stdout_offset, acked_stderr=stderr_offset)
        if watch:
            self.watchers.append(attachment)
        else:
            self.attachments.append(attachment)
            self.idle_since = None
            self.grace_until = None
        return attachment

    def detach(self, attachment: Attachment, now: float) -> list[Effect]:
        """A client left (cleanly or not); the last one leaving may end the command.

        While the command runs, the cursor of a client that left keeps pacing for
        ``stall_seconds`` (it *lingers*): a client cut off by the network reconnects
        within that time and finds every byte it had not received. It counts for nothing
        else (not for the idle clock, not for ``kill_on_disconnect``). A watcher leaving
        lingers the same way and changes nothing else.
        """
        clients = self.watchers if attachment.watch else self.attachments
        if attachment in clients:
            clients.remove(attachment)
            if self.state is SessionState.RUNNING and not self.lifetimes.kill_on_disconnect:
                attachment.waiting = False
                attachment.last_progress = now
                self._forget_lingering(now)
                self.lingering.append(attachment)
        if attachment.watch or self.attachments or self.grace_until is not None:
            return []
        self.idle_since = now
        if self.lifetimes.kill_on_disconnect:
            return self.request_kill(EndReason.DISCONNECT)
        return []

    def begin_grace(self, now: float, seconds: float) -> None:
        """A live upgrade is about to close this session's clients: they have ``seconds``
        to come back before leaving counts (see the module docstring)."""
        if self.state is SessionState.RUNNING and self.attachments:
            self.grace_until = now + seconds

    def _forget_lingering(self, now: float) -> None:
        """Drop the cursors of clients gone ``stall_seconds`` or more."""
        if self.lingering:
            stall = self.stall_seconds
            self.lingering = [a for a in self.lingering if now - a.last_progress < stall]

    def ring(self, stream: Stream) -> RingBuffer:
        """The output ring of ``stream``."""
        return self.stdout if stream is Stream.STDOUT else self.stderr

    def read(self, attachment: Attachment, stream: Stream, max_bytes: int) -> ReadResult:
        """The next output this client should get from ``stream``."""
        return self.ring(stream).read_from(attachment.cursor(stream), max_bytes)

    def finished_for(self, attachment: Attachment) -> bool:
        """Whether the client has all of a finished session's output: next, its end."""
        return self.state is not SessionState.RUNNING and self.caught_up(attachment)

    def caught_up(self, attachment: Attachment) -> bool:
        """Whether the client has everything buffered so far in both streams."""
        return (
            attachment.stdout_cursor >= self.stdout.end
            and attachment.stderr_cursor >= self.stderr.end
        )

    def may_read(self, stream: Stream, now: float, chunk: int) -> bool:
        """Whether the child's next ``chunk`` bytes of ``stream`` may be read now.

        Output is paced like a pipe by the slowest client that is keeping up: the child
        is read while it is less than ``capacity // PACE_WINDOW`` ahead of every such
        client. A client keeps up while it takes output (``waiting`` parked with all of
        it, or progress within ``stall_seconds``) and is no more than
        ``capacity // LAG_LIMIT`` behind the leading client. A client that went quiet or
        fell that far behind stops pacing and may later see a gap; it paces again once
        it catches up. Watchers pace exactly like clients (acknowledged delivery
        included). Lingering cursors of clients that left count until they have been
        gone ``stall_seconds``. With nobody attached or lingering, reading never waits.
        A client that acknowledges delivery paces by what it acknowledged
        (``pacing_cursor``).
        """
        self._forget_lingering(now)
        stall = self.stall_seconds
        cursors = [
            cursor
            for clients, attached in (
                (self.attachments, True),
                (self.watchers, True),
                (self.lingering, False),
            )
            for a in clients
            if (cursor := pacing_cursor(a, stream, now, stall, attached=attached)) is not None
        ]
        if not cursors:
            return True
        ring = self.ring(stream)
        floor = max(cursors) - ring.capacity // LAG_LIMIT
        # (A ring too small for PACE_WINDOW still gives a caught-up client a whole chunk.)
        slowest = min(c for c in cursors if c >= floor)
        return ring.end - slowest + chunk <= max(ring.capacity // PACE_WINDOW, chunk)

    # ---- timers -----------------------------------------------------------------

    def next_deadline(self) -> float:
        """The earliest time at which ``on_timer`` has something to do (inf: never)."""
        lt = self.lifetimes
        if self.state is SessionState.RUNNING and self.kill_reason is None:
            deadline = math.inf
            if lt.timeout_seconds > 0:
                deadline = self.started_at + lt.timeout_seconds
            if lt.idle_timeout_seconds > 0 and self.idle_since is not None:
                deadline = min(deadline, self.idle_since + lt.idle_timeout_seconds)
            if self.grace_until is not None:
                deadline = min(deadline, self.grace_until)
            return deadline
        if self.state is SessionState.FINISHED and lt.ttl_seconds >= 0:
            assert self.ended_at is not None
            return self.ended_at + lt.ttl_seconds
        return math.inf

    def on_timer(self, now: float) -> list[Effect]:
        """Fire whatever deadline ``now`` has reached."""
        lt = self.lifetimes
        if self.state is SessionState.RUNNING and self.kill_reason is None:
            if lt.timeout_seconds > 0 and now >= self.started_at + lt.timeout_seconds:
                return self.request_kill(EndReason.TIMEOUT)
            if self.grace_until is not None and now >= self.grace_until:
                ended, self.grace_until = self.grace_until, None
                if not self.attachments:  # nobody came back: the client left at its end
                    self.idle_since = ended
                    if lt.kill_on_disconnect:
                        return self.request_kill(EndReason.DISCONNECT)
            idle = lt.idle_timeout_seconds
            if idle > 0 and self.idle_since is not None and now >= self.idle_since + idle:
                return self.request_kill(EndReason.IDLE)
            return []
        return self._expire_if_due(now)

    def _expire_if_due(self, now: float) -> list[Effect]:
        if self.state is not SessionState.FINISHED or self.lifetimes.ttl_seconds < 0:
            return []
        assert self.ended_at is not None
        if now >= self.ended_at + self.lifetimes.ttl_seconds:
            self._move("expire")
            return [Expire()]
        return []

    # ---- reporting --------------------------------------------------------------

    def terminal_message(self) -> Exit | Error:
        """The frame that ends every client's stream: ``exit``, or ``error`` on timeout."""
        assert self.status is not None and self.end_reason is not None
        if self.end_reason is EndReason.TIMEOUT:
            return Error(
                error_type="CommandTimeout",
                error=f"Command timed out after {self.lifetimes.timeout_seconds} seconds",
            )
        status = self.status
        return Exit(
            exit_code=status.code,
            signal=signal_name(status.signal) if status.signal is not None else None,
            reason=self.end_reason.value,
            cpu_seconds=round(status.cpu_seconds, 6),
            peak_rss_bytes=status.peak_rss_bytes,
        )


# ---- acknowledged delivery ------------------------------------------------------------
#
# Bytes written to a socket are not yet received: kernel buffers, proxies and the client
# library's queue can hold megabytes. A transport that can (the lean WebSocket path) sends a
# ping behind the output it wrote and the client's pong acknowledges everything before it.
# These rules say which offsets count as delivered, for pacing and for a lingering cursor.


@dataclass(eq=False, slots=True)
class Delivery:
    """What one client has acknowledged (pongs to pings sent behind its output).

    At most one ping is outstanding. ``answered`` turns true with the first pong; a client
    that never answers (a raw client, or a transport that cannot see pongs) is paced by
    its written cursors as before while attached. The acknowledged offsets start at the
    attach offsets.
    """

    answered: bool = False
    acked_stdout: int = 0
    acked_stderr: int = 0
    heard_at: float = 0.0  # the last acknowledging pong
    seq: int = 0  # the number of the last ping sent
    pinged: tuple[int, int] | None = None  # cursors written before the last ping sent
    outstanding: bool = False
    pinged_at: float = 0.0

    def acked(self, stream: Stream) -> int:
        """The offset in ``stream`` up to which the client acknowledged delivery."""
        return self.acked_stdout if stream is Stream.STDOUT else self.acked_stderr


def ping_due(attachment: Attachment) -> bool:
    """Whether a ping should follow what was written: none is outstanding, and output was
    written since the last one (or none was sent yet)."""
    delivery = attachment.delivery
    written = (attachment.stdout_cursor, attachment.stderr_cursor)
    return not delivery.outstanding and delivery.pinged != written


def start_ping(attachment: Attachment, now: float) -> bytes:
    """Record a ping sent behind everything written so far; its payload (<= 125 bytes)."""
    delivery = attachment.delivery
    delivery.seq += 1
    delivery.pinged = (attachment.stdout_cursor, attachment.stderr_cursor)
    delivery.outstanding = True
    delivery.pinged_at = now
    return b"sandboxd %d" % delivery.seq


def receive_pong(attachment: Attachment, payload: bytes, now: float) -> bool:
    """A pong came: True when it answers the outstanding ping, whose offsets are now
    acknowledged. Any other pong (unsolicited, stale) changes nothing."""
    delivery = attachment.delivery
    if not delivery.outstanding or payload != b"sandboxd %d" % delivery.seq:
        return False
    assert delivery.pinged is not None
    delivery.acked_stdout, delivery.acked_stderr = delivery.pinged
    delivery.answered = True
    delivery.outstanding = False
    delivery.heard_at = now
    return True


def pacing_cursor(
    attachment: Attachment, stream: Stream, now: float, stall: float, *, attached: bool
) -> int | None:
    """The offset at which ``attachment`` paces ``stream``, or None if it does not pace.

    * A lingering cursor (``attached`` false; it is dropped ``stall`` after its client
      left) paces at what its client acknowledged: its attach offsets if it was pinged
      but never answered (it may have left before its first pong came back). Only a
      client that was never pinged (a transport that cannot see pongs) lingers at what
      was written to it.
    * An attached client that answers pings paces at its acknowledged offset while its
      answers are fresh: the outstanding ping was sent less than ``stall`` ago, or with
      none outstanding, it answered less than ``stall`` ago or is parked with everything.
    * Otherwise (it never answered, or stopped answering) the written cursor paces while
      the client takes output (parked, or progress within ``stall``), as for any client.
    """
    delivery = attachment.delivery
    if not attached:
        pinged = delivery.answered or delivery.pinged is not None
        return delivery.acked(stream) if pinged else attachment.cursor(stream)
    if delivery.answered:
        since = delivery.pinged_at if delivery.outstanding else delivery.heard_at
        if now - since < stall or (attachment.waiting and not delivery.outstanding):
            return delivery.acked(stream)
    if attachment.waiting or now - attachment.last_progress < stall:
        return attachment.cursor(stream)
    return None


def signal_name(signo: int) -> str:
    """``9`` -> ``"KILL"``; an unnamed number stays a number in text."""
    try:
        return signal_module.Signals(signo).name.removeprefix("SIG")
    except ValueError:
        return str(signo)
