"""The session registry and everything that runs on behalf of a session.

Per session, one task (``_supervise``) owns the child's fds: it pumps stdout and stderr
through the UTF-8 sanitiser into the rings, writes queued stdin, keeps one deadline scope
for the session's timers, and carries out the effects the core (``session.py``) returns.
Clients never touch fds: they read rings through their own ``Attachment``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable

import psutil
import trio

from sandboxd.core.config import CHUNK_BYTES, Config
from sandboxd.core.environment import clean_environment
from sandboxd.core.errors import (
    CommandNotFound,
    ServerShuttingDown,
    SessionExpired,
    TooManySessions,
)
from sandboxd.core.expired import ExpiredIds
from sandboxd.core.messages import Execute, validate_execute
from sandboxd.core.ringbuffer import BufferPool, ReadResult
from sandboxd.core.session import (
    Attachment,
    EndReason,
    ExitStatus,
    Expire,
    KillTree,
    Lifetimes,
    Session,
    SessionState,
    Stream,
)
from sandboxd.core.utf8 import Utf8Sanitizer
from sandboxd.runtime import process, spawn
from sandboxd.runtime.drain import DrainClock
from sandboxd.runtime.fdread import read_available
from sandboxd.runtime.handoff import Handoffs
from sandboxd.runtime.request import spawn_request

log = logging.getLogger("sandboxd.supervisor")

#: Input queued for a command's stdin beyond which the sending socket is not read.
STDIN_BUFFER_CAP = 8 * 1024 * 1024
#: How many expired ids are remembered, to answer SessionExpired rather than CommandNotFound.
EXPIRED_IDS_KEPT = 100_000


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
            assert self.child.input_fd is not None
            spawn.set_window_size(self.child.input_fd, cols, rows)

    async def write_stdin(self) -> None:
        """Write queued input to the child until stdin is closed or the child stops reading."""
        assert self.child.input_fd is not None
        stream = trio.lowlevel.FdStream(self.child.input_fd)
        try:
            while True:
                if self._stdin:
                    data = bytes(self._stdin[:65536])  # the rest stays queued: under the cap
                    del self._stdin[:65536]
                    self.notify_changed()  # wakes queue_input waiters
                    await stream.send_all(data)
                elif self._stdin_closing:
                    return
                else:
                    await self._stdin_event.wait()
                    self._stdin_event = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the child closed its stdin; what it did not read is dropped
        finally:
            self._stdin_closing = True
            self._terminal_open = False
            self._stdin.clear()
            stream.close()

    # ---- output -----------------------------------------------------------------

    async def pump(self, stream: Stream, fd: int, stall_seconds: float, drain: float) -> None:
        """Read one output fd into its ring until EOF (or EIO, a PTY's EOF), or until the
        drain after the leader's exit is spent (``drain.DrainClock``). Reads are coalesced
        up to a chunk (a PTY hands out about 4 KiB a read); the task yields after every
        chunk, so a child that never pauses cannot starve the clients."""
        ring = self.core.ring(stream)
        sanitizer = Utf8Sanitizer()
        clock = DrainClock(drain, reaped=self.reaped.is_set())
        self._drain_clocks.append(clock)
        os.set_blocking(fd, False)
        try:
            with clock.scope:
                ended = False
                while not ended:
                    if not self.core.may_read(stream, trio.current_time(), CHUNK_BYTES):
                        clock.paced(True)
                        while not self.core.may_read(stream, trio.current_time(), CHUNK_BYTES):
                            with trio.move_on_after(stall_seconds):
                                await self._consumed.wait()
                        clock.paced(False)
                    data, ended = read_available(fd, CHUNK_BYTES)
                    if data is None:
                        await trio.lowlevel.wait_readable(fd)
                        continue
                    clean = sanitizer.feed(data)
                    if clean:
                        ring.append(clean)
                        self.notify_changed()
                    await trio.lowlevel.checkpoint()
        finally:
            ring.append(sanitizer.finish())
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
            self.notify_changed()


class Supervisor:
    """Owns every session, keyed by ``command_id``."""

    def __init__(
        self,
        config: Config,
        reaper: process.Reaper,
        nursery: trio.Nursery,
        *,
        spawn: Callable[[spawn.SpawnRequest], spawn.Child] = spawn.spawn,
        kill_tree: Callable[[int, int, str | None], None] = process.kill_tree,
    ) -> None:
        self.config = config
        self._spawn = spawn
        self._kill_tree = kill_tree
        self.reaper = reaper
        self.pool = BufferPool(config.buffer_cap_bytes)
        self.sessions: dict[str, LiveSession] = {}
        self._starting: dict[str, trio.Event] = {}
        self._expired_ids = ExpiredIds(EXPIRED_IDS_KEPT)
        self._nursery = nursery
        self.handoffs = Handoffs(self.detach, nursery, config.stall_seconds)
        self.shutting_down = False
        self.commands_started = 0
        self._base_env = clean_environment(os.environ, frozen=getattr(sys, "frozen", False))

    # ---- lookup and creation ------------------------------------------------------

    def lookup(self, command_id: str) -> LiveSession:
        """The session under ``command_id``; raises CommandNotFound / SessionExpired."""
        live = self.sessions.get(command_id)
        if live is not None:
            return live
        if command_id in self._expired_ids:
            raise SessionExpired(f"Session expired: {command_id}")
        raise CommandNotFound(f"Command not found: {command_id}")

    async def get_or_create(self, msg: Execute, via: str = "ws") -> tuple[LiveSession, bool]:
        """The session under ``msg.command_id``, started now if unknown.

        Two executes with one id never spawn twice: while one spawns (as a ``user``, in
        a worker thread), the other waits for it and then attaches. Raises
        ``InvalidRequest``, ``SpawnFailed``, ``TooManySessions``.
        """
        validate_execute(msg)
        while msg.command_id is not None:
            if msg.command_id in self.sessions:
                return self.sessions[msg.command_id], False
            starting = self._starting.get(msg.command_id)
            if starting is None:
                break
            await starting.wait()  # then look again: it may have failed to spawn
        if self.shutting_down:
            raise ServerShuttingDown("sandboxd is shutting down")
        if len(self.sessions) + len(self._starting) >= self.config.max_sessions:
            raise TooManySessions(
                f"{len(self.sessions)} sessions are live, the cap (--max-sessions) is reached"
            )
        command_id = msg.command_id or uuid.uuid4().hex
        request = spawn_request(self.config, self._base_env, msg, command_id)
        self._starting[command_id] = starting = trio.Event()
        try:
            since = self.reaper.sequence
            # Not abandoned on cancellation: the child is registered before anything else.
            child = await spawn.start(self._spawn, request)
        finally:
            del self._starting[command_id]
            starting.set()
        now = trio.current_time()
        core = Session(
            command_id=command_id,
            pid=child.pid,
            lifetimes=Lifetimes(
                timeout_seconds=msg.timeout_seconds,
                idle_timeout_seconds=msg.idle_timeout_seconds,
                ttl_seconds=msg.ttl_seconds,
                kill_on_disconnect=msg.kill_on_disconnect,
            ),
            stdout=self.pool.ring(self.config.ring_bytes),
            stderr=self.pool.ring(self.config.ring_bytes),
            started_at=now,
            stall_seconds=self.config.stall_seconds,
        )
        live = LiveSession(core, child, msg.command)
        self.reaper.watch(child, live.on_reaped, since=since)
        self.sessions[command_id] = live
        self.commands_started += 1
        self._expired_ids.discard(command_id)
        self._nursery.start_soon(self._supervise, live)
        log.info(
            "command started",
            extra={"command_id": command_id, "pid": child.pid, "pty": child.pty, "via": via},
        )
        return live, True

    # ---- clients --------------------------------------------------------------------

    def attach(
        self, live: LiveSession, stdout_offset: int, stderr_offset: int, *, watch: bool = False
    ) -> Attachment:
        """Attach a client (or, with ``watch``, a watcher) at the given offsets."""
        attachment = live.core.attach(
            trio.current_time(), stdout_offset, stderr_offset, watch=watch
        )
        live.reschedule()
        return attachment

    def detach(self, live: LiveSession, attachment: Attachment, at: float | None = None) -> None:
        """Detach a client (that left ``at``, default now); may kill the command
        (``kill_on_disconnect``). The last client of a session already gone frees its output."""
        self.apply(live, live.core.detach(attachment, trio.current_time() if at is None else at))
        self._release_if_unread(live)

    def kill(self, live: LiveSession, reason: EndReason = EndReason.KILLED) -> None:
        """Kill the command's whole tree, if it still runs."""
        self.apply(live, live.core.request_kill(reason))

    def apply(self, live: LiveSession, effects: Iterable[KillTree | Expire]) -> None:
        """Carry out the core's effects, then re-aim the session's timer."""
        for effect in effects:
            if isinstance(effect, KillTree):
                if live.status is None:  # after the reap the pid may be reused
                    self._kill_tree(live.child.pid, signal.SIGKILL, live.command_id)
                log.info(
                    "command killed",
                    extra={"command_id": live.command_id, "reason": effect.reason.value},
                )
            else:
                live.expired.set()
                self._drop(live)
        live.reschedule()
        live.notify_changed()

    # ---- the session task -------------------------------------------------------------

    async def _supervise(self, live: LiveSession) -> None:
        child = live.child
        try:
            async with trio.open_nursery() as nursery:
                if child.input_fd is not None:
                    nursery.start_soon(live.write_stdin)
                async with trio.open_nursery() as readers:
                    # Each pump waits a bounded time for the EOF of children left behind.
                    timing = (self.config.stall_seconds, self.config.drain_seconds)
                    readers.start_soon(live.pump, Stream.STDOUT, child.output_fd, *timing)
                    if child.error_fd is not None:
                        readers.start_soon(live.pump, Stream.STDERR, child.error_fd, *timing)
                    await self._run_timers(live, until=live.reaped)
                assert live.status is not None
                live.end_input()
                live.ended_wall = time.time()
                self.pool.retire(live.core.stdout)
                self.pool.retire(live.core.stderr)
                self.apply(live, live.core.finish(trio.current_time(), live.status))
                log.info(
                    "command finished",
                    extra={
                        "command_id": live.command_id,
                        "exit_code": live.status.code,
                        "reason": live.core.end_reason.value if live.core.end_reason else None,
                    },
                )
                await self._run_timers(live, until=live.expired)
                nursery.cancel_scope.cancel()
        finally:
            self._drop(live)
            if live.status is None:  # cancelled while running (daemon stopping)
                self._kill_tree(child.pid, signal.SIGKILL, live.command_id)
            live.notify_changed()

    def _drop(self, live: LiveSession) -> None:
        """Take the session out of the registry: its TTL ran out (new clients are then
        told it expired), or the daemon stops. Clients still attached read on to the end."""
        if self.sessions.get(live.command_id) is live:
            del self.sessions[live.command_id]
            if live.core.state is SessionState.EXPIRED:
                self._expired_ids.add(live.command_id)
        self._release_if_unread(live)

    def _release_if_unread(self, live: LiveSession) -> None:
        """Free the output of a session out of the registry once no client reads it."""
        if self.sessions.get(live.command_id) is not live and not live.core.attachments:
            self.pool.release(live.core.stdout)
            self.pool.release(live.core.stderr)

    async def _run_timers(self, live: LiveSession, until: trio.Event) -> None:
        """Carry out the session's timers until ``until`` is set (in the session's own
        task: a task of their own cost one more per command)."""
        while not until.is_set():
            with trio.CancelScope(deadline=live.core.next_deadline()) as scope:
                live.timer_scope = scope
                await until.wait()
            live.timer_scope = None
            if scope.cancelled_caught:
                self.apply(live, live.core.on_timer(trio.current_time()))

    # ---- shutdown ---------------------------------------------------------------------

    async def stop_all(self, grace: float) -> None:
        """SIGTERM every running command, SIGKILL what is left after ``grace`` seconds.

        The processes that escaped their commands' trees are looked up once for all
        sessions (one pass over /proc), not once per session.
        """
        self.shutting_down = True
        running = [s for s in self.sessions.values() if s.status is None]
        escaped = process.tagged_processes({live.command_id for live in running})
        for live in running:
            live.core.request_kill(EndReason.SHUTDOWN)
            self._signal_all(live, signal.SIGTERM, escaped)
        with trio.move_on_after(grace):
            for live in running:
                await live.reaped.wait()
        for live in running:
            self._signal_all(live, signal.SIGKILL, escaped)
        with trio.move_on_after(2 + self.config.drain_seconds):
            for live in running:
                while live.core.state is SessionState.RUNNING:
                    await live.wait_changed()

    def _signal_all(
        self, live: LiveSession, signo: int, escaped: dict[str, list[psutil.Process]]
    ) -> None:
        if live.status is None:
            self._kill_tree(live.child.pid, signo, None)
        for escapee in escaped.get(live.command_id, []):
            with contextlib.suppress(psutil.Error):
                escapee.send_signal(signo)

    def snapshot(self) -> list[dict[str, object]]:
        """What ``GET /sessions`` shows."""
        rows: list[dict[str, object]] = []
        for live in self.sessions.values():
            core = live.core
            rows.append(
                {
                    "command_id": core.command_id,
                    "pid": core.pid,
                    "state": core.state.value,
                    "pty": live.child.pty,
                    "clients": len(core.attachments),
                    "watchers": len(core.watchers),
                    "stdout_bytes": core.stdout.end,
                    "stderr_bytes": core.stderr.end,
                    "stdout_retained": core.stdout.size,
                    "stderr_retained": core.stderr.size,
                    "started_at": live.started_wall,
                    "ended_at": live.ended_wall,
                    "exit_code": live.status.code if live.status else None,
                    "reason": core.end_reason.value if core.end_reason else None,
                    "command": live.command[:200],
                }
            )
        return rows
