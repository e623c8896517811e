"""The trio side of one session: its child's fds, its wake-ups and its stdin queue.

``LiveSession`` pumps stdout and stderr through the UTF-8 sanitiser into the rings and
writes queued stdin; the supervisor (``supervisor.py``) runs those tasks and owns the
registry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time

import trio

from sandboxd.core.config import read_limit
from sandboxd.core.ringbuffer import ReadResult
from sandboxd.core.session import Attachment, ExitStatus, Session, Stream
from sandboxd.core.utf8 import Utf8Sanitizer
from sandboxd.runtime import spawn
from sandboxd.runtime.drain import DrainClock
from sandboxd.runtime.fdread import read_available

log = logging.getLogger("sandboxd.supervisor")

#: Input queued for a command's stdin beyond which the sending socket is not read.
STDIN_BUFFER_CAP = 8 * 1024 * 1024


class LiveSession:
    """The trio side of one session: its child, its wake-ups and its stdin queue."""

    def __init__(self, core: Session, child: spawn.Child, command: str) -> None:
        self.core = core
        self.child = child
        self.command = command
        self.started_wall = time.time()
        self.ended_wall: float | None = None
        self.status: ExitStatus | None = None
        self.reaped = trio.Event()
        self.expired = trio.Event()
        self._changed = trio.Event()
        self._consumed = trio.Event()
        self._drain_clocks: list[DrainClock] = []
        self._stdin = bytearray()
        self._stdin_closing = child.input_fd is None
        self._stdin_event = trio.Event()
        self._terminal_open = child.pty
        self.timer_scope: trio.CancelScope | None = None
        # What a live upgrade carries: the fds still open, and each pump's sanitiser.
        self.open_fds: dict[Stream, int] = {Stream.STDOUT: child.output_fd}
        if child.error_fd is not None:
            self.open_fds[Stream.STDERR] = child.error_fd
        self.input_open = child.input_fd is not None
        self.sanitizers: dict[Stream, Utf8Sanitizer] = {}
        self.first_read_ns = 0  # (monotonic: an upgrade times its stream gap)
        # A relayed PTY (spawn.py, "PTY relays"): the master, held until both the output
        # pump and the stdin writer have ended, and each relay's pid until it is reaped.
        self.terminal_fd = child.terminal_fd
        self.output_relay, self.input_relay = child.relays or (0, 0)

    def stdin_state(self) -> tuple[bytes, bool, bool]:
        """Queued stdin not yet written, whether stdin is closing, whether the terminal
        is open (for the handover)."""
        return bytes(self._stdin), self._stdin_closing, self._terminal_open

    def restore_stdin(self, pending: bytes, closing: bool, terminal_open: bool) -> None:
        """Take over a queue that ``stdin_state`` gave in the old image."""
        self._stdin = bytearray(pending)
        self._stdin_closing = closing
        self._terminal_open = terminal_open

    @property
    def command_id(self) -> str:
        """The session's key."""
        return self.core.command_id

    # ---- wake-ups ---------------------------------------------------------------

    def notify_changed(self) -> None:
        """New output or a new state: wake every attached client."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Sleep until ``notify_changed``."""
        await self._changed.wait()

    def notify_consumed(self) -> None:
        """A client took output: wake a reader that is pacing the child."""
        self._consumed.set()
        self._consumed = trio.Event()

    def delivered(self, attachment: Attachment, stream: Stream, result: ReadResult) -> None:
        """``result`` reached the client (or was skipped as a gap): move its cursor."""
        attachment.advance(stream, result, trio.current_time())
        self.notify_consumed()

    async def wait_for_output(self, attachment: Attachment, patience: float = math.inf) -> bool:
        """Park a caught-up client until the session changes; False if ``patience`` ran out.

        While parked it still counts as ready to take output (it paces the child).
        """
        attachment.waiting = True
        try:
            if patience == math.inf:  # no cancel scope for a wait without a deadline
                await self._changed.wait()
                return True
            with trio.move_on_after(patience) as scope:
                await self._changed.wait()
        finally:
            attachment.waiting = False
            attachment.last_progress = trio.current_time()
        return not scope.cancelled_caught

    def reschedule(self) -> None:
        """Point the timer scope at the core's next deadline."""
        if self.timer_scope is not None:
            self.timer_scope.deadline = self.core.next_deadline()

    def on_reaped(self, status: ExitStatus) -> None:
        """Called by the reaper."""
        self.status = status
        self.reaped.set()
        for clock in self._drain_clocks:
            clock.leader_reaped()

    # ---- stdin ------------------------------------------------------------------

    async def queue_input(self, data: bytes) -> None:
        """Queue bytes for stdin at once (calls keep their order), then wait while over cap."""
        if self._stdin_closing:
            log.debug("input after stdin closed ignored", extra={"command_id": self.command_id})
            return
        self._stdin += data
        self._stdin_event.set()
        while len(self._stdin) > STDIN_BUFFER_CAP and not self._stdin_closing:
            await self.wait_changed()

    def close_input(self) -> None:
        """Half-close stdin once the queued input is written (ignored under a PTY)."""
        if not self.child.pty:
            self.end_input()

    def end_input(self) -> None:
        """No more input will come: the command finished (PTY or not)."""
        self._stdin_closing = True
        self._stdin_event.set()

    def resize(self, cols: int, rows: int) -> None:
        """Set a PTY command's window size; nothing for pipes or once its terminal closed."""
        if self.child.pty and self._terminal_open:
            fd = self.terminal_fd if self.terminal_fd is not None else self.child.input_fd
            assert fd is not None
            spawn.set_window_size(fd, cols, rows)

    # ---- PTY relays -------------------------------------------------------------

    def relay_reaped(self, pid: int) -> None:
        """The reaper collected relay ``pid``: it is never signalled after this."""
        if pid == self.output_relay:
            self.output_relay = 0
        if pid == self.input_relay:
            self.input_relay = 0

    def _let_go_of_terminal(self, relay: int) -> None:
        """The output pump or the stdin writer ended: kill its relay (one still there
        waits on a terminal that a background child holds), and close the master once
        neither needs it (the terminal hangs up when its last master fd closes)."""
        if relay:  # not reaped yet, so the pid is still that relay's
            with contextlib.suppress(ProcessLookupError):
                os.kill(relay, signal.SIGKILL)
        released = Stream.STDOUT not in self.open_fds and not self.input_open
        if released and self.terminal_fd is not None:
            os.close(self.terminal_fd)
            self.terminal_fd = None

    async def write_stdin(self) -> None:
        """Write queued input to the child until stdin is closed or the child stops reading.

        A byte leaves the queue only once the kernel took it, so the queue is exact at
        every checkpoint (a live upgrade carries it)."""
        fd = self.child.input_fd
        assert fd is not None
        os.set_blocking(fd, False)
        try:
            while True:
                if self._stdin:
                    try:
                        written = os.write(fd, bytes(self._stdin[:65536]))
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)
                        continue
                    del self._stdin[:written]
                    self.notify_changed()  # wakes queue_input waiters
                    await trio.lowlevel.checkpoint()
                elif self._stdin_closing:
                    return
                else:
                    await self._stdin_event.wait()
                    self._stdin_event = trio.Event()
        except OSError:
            return  # the child closed its stdin (EPIPE, EIO): what it did not read is dropped
        finally:
            self._stdin_closing = True
            self._terminal_open = False
            self._stdin.clear()
            self.input_open = False
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
            if self.child.relays is not None:
                self._let_go_of_terminal(self.input_relay)

    # ---- output -----------------------------------------------------------------

    async def pump(self, stream: Stream, fd: int, stall_seconds: float, drain: float) -> None:
        """Read one output fd into its ring until EOF (or EIO, a PTY's EOF) or the drain
        after the leader's exit is spent (``DrainClock``), coalescing reads (a PTY gives ~4
        KiB each) up to ``read_limit``. It yields when the fd is empty, and after every
        ``read_limit`` bytes read without waiting, so no child starves clients (a yield after
        every read cost two passes of the scheduler per short command)."""
        ring = self.core.ring(stream)
        limit = read_limit(ring.capacity)
        sanitizer = self.sanitizers.setdefault(stream, Utf8Sanitizer())
        clock = DrainClock(drain, reaped=self.reaped.is_set())
        self._drain_clocks.append(clock)
        os.set_blocking(fd, False)
        try:
            with clock.scope:
                ended = False
                unyielded = 0  # bytes read since the pump last yielded
                while not ended:
                    if not self.core.may_read(stream, trio.current_time(), limit):
                        clock.paced(True)
                        while not self.core.may_read(stream, trio.current_time(), limit):
                            with trio.move_on_after(stall_seconds):
                                await self._consumed.wait()
                        clock.paced(False)
                    data, ended = read_available(fd, limit)
                    if data is None:
                        unyielded = 0
                        await trio.lowlevel.wait_readable(fd)
                        continue
                    if not self.first_read_ns:
                        self.first_read_ns = time.monotonic_ns()
                    clean = sanitizer.feed(data)
                    if clean:
                        ring.append(clean)
                        self.notify_changed()
                    unyielded += len(data)
                    if unyielded >= limit and not ended:
                        unyielded = 0
                        await trio.lowlevel.checkpoint()
                if stream is Stream.STDOUT and self.terminal_fd is not None:
                    left = left_in_master(self.terminal_fd)
                    if left:
                        ring.append(sanitizer.feed(left))
                        self.notify_changed()
        finally:
            ring.append(sanitizer.finish())
            self.open_fds.pop(stream, None)
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
            if self.child.relays is not None:
                self._let_go_of_terminal(self.output_relay)
            self.notify_changed()


def left_in_master(master: int) -> bytes:
    """What a relayed PTY's master still holds once its output relay has ended.

    A blocking read of a master can get EIO (every holder of the slave has gone) while
    the command's last write is still on its way into the line discipline: the relay
    then exits without it, and a later read finds it there (2 runs in 3,000 of ``cat;
    echo rc=$?``, the ``rc=0`` line, measured without the daemon). So once the relay's
    pipe is at its end, the master is read here until EIO (or until it would block: a
    child still holds the slave). The relay is gone by then, so making this fd of the
    shared open file non-blocking troubles no one."""
    os.set_blocking(master, False)
    parts: list[bytes] = []
    total = 0
    while total < 1 << 20:  # (the tty buffers hold far less)
        try:
            piece = os.read(master, 65536)
        except OSError:  # EIO at the end, EAGAIN while a child holds the slave
            break
        if not piece:
            break
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)
