"""The session registry and everything that runs on behalf of a session.

Per session, one task (``_supervise``) owns the child's fds: it pumps stdout and stderr
through the UTF-8 sanitiser into the rings, writes queued stdin, keeps one deadline scope
for the session's timers, and carries out the effects the core (``session.py``) returns.
Clients never touch fds: they read rings through their own ``Attachment``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from sandboxd.core.config import Config
from sandboxd.core.environment import clean_environment
from sandboxd.core.errors import (
    CommandNotFound,
    ServerShuttingDown,
    SessionExpired,
    TooManySessions,
)
from sandboxd.core.expired import ExpiredIds
from sandboxd.core.messages import Execute, validate_execute
from sandboxd.core.ringbuffer import BufferPool
from sandboxd.core.session import (
    Attachment,
    EndReason,
    ExitStatus,
    Expire,
    KillTree,
    Lifetimes,
    Session,
    SessionState,
)
from sandboxd.runtime import process, spawn
from sandboxd.runtime.handoff import Handoffs
from sandboxd.runtime.live import STDIN_BUFFER_CAP, LiveSession
from sandboxd.runtime.request import spawn_request
from sandboxd.runtime.spawner import SpawnHelper

if TYPE_CHECKING:  # (imported where used: it is not on the path to serving)
    import psutil

__all__ = ["STDIN_BUFFER_CAP", "LiveSession", "Supervisor"]

log = logging.getLogger("sandboxd.supervisor")

#: How many expired ids are remembered, to answer SessionExpired rather than CommandNotFound.
EXPIRED_IDS_KEPT = 100_000


def _relay_watcher(live: LiveSession, pid: int) -> Callable[[ExitStatus], None]:
    def reaped(_status: ExitStatus) -> None:
        live.relay_reaped(pid)

    return reaped


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
        # Expired sessions out of the registry that clients still read (a live upgrade
        # carries them), and those carried ones whose client has not come back yet.
        self.unread: dict[str, LiveSession] = {}
        self._returning: set[str] = set()
        self._held: set[str] = set()  # (while an upgrade closes their clients)
        self._nursery = nursery
        self.handoffs = Handoffs(self.detach, nursery, config.stall_seconds)
        self.shutting_down = False
        self._upgrading = False
        self._upgrade_over = trio.Event()
        self._upgrade_over.set()
        self.commands_started = 0
        self.spawn_helper: SpawnHelper | None = None  # (service.serve starts it)
        self._base_env = clean_environment(os.environ, frozen=getattr(sys, "frozen", False))

    @property
    def upgrading(self) -> bool:
        """A live upgrade is draining or swapping: nothing new starts."""
        return self._upgrading

    @upgrading.setter
    def upgrading(self, value: bool) -> None:
        self._upgrading = value
        if not value:
            self._upgrade_over.set()
        elif self._upgrade_over.is_set():
            self._upgrade_over = trio.Event()

    # ---- lookup and creation ------------------------------------------------------

    def lookup(self, command_id: str) -> LiveSession:
        """The session under ``command_id``; raises CommandNotFound / SessionExpired."""
        live = self.sessions.get(command_id)
        if live is not None:
            return live
        if command_id in self._returning:  # (its client, back after a live upgrade)
            return self.unread[command_id]
        if command_id in self._expired_ids:
            raise SessionExpired(f"Session expired: {command_id}")
        raise CommandNotFound(f"Command not found: {command_id}")

    async def get_or_create(self, msg: Execute, via: str = "ws") -> tuple[LiveSession, bool]:
        """The session under ``msg.command_id``, started now if unknown.

        Two executes with one id never spawn twice: while one spawns (as a ``user``, in
        a worker thread), the other waits for it and then attaches. Raises
        ``InvalidRequest``, ``SpawnFailed``, ``TooManySessions``.

        An execute on a WebSocket (``via="ws"``) that comes in while a live upgrade is
        under way waits for its outcome: the swap closes the socket with 1000 before
        ``started`` (both SDKs re-send the execute, to the new image), a refusal lets it
        start here. (An ``error`` frame would end the SDKs' ``run()``.) An HTTP one is
        refused with 503, which the Python SDK retries.
        """
        validate_execute(msg)
        while True:
            if msg.command_id is not None:
                if msg.command_id in self.sessions:
                    return self.sessions[msg.command_id], False
                starting = self._starting.get(msg.command_id)
                if starting is not None:
                    await starting.wait()  # then look again: it may have failed to spawn
                    continue
            if self.upgrading and via == "ws" and not self.shutting_down:
                await self._upgrade_over.wait()
                continue
            break
        if self.shutting_down or self.upgrading:
            what = "upgrading" if self.upgrading else "shutting down"
            raise ServerShuttingDown(f"sandboxd is {what}")
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
            child = await spawn.start(self._spawn, request, self.spawn_helper)
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
        self.watch_relays(live, since)
        self.sessions[command_id] = live
        self.commands_started += 1
        self._expired_ids.discard(command_id)
        self._nursery.start_soon(self._supervise, live)
        log.info(
            "command started",
            extra={"command_id": command_id, "pid": child.pid, "pty": child.pty, "via": via},
        )
        return live, True

    def expired_keys(self) -> list[int]:
        """The expired-id memory, for a live upgrade."""
        return self._expired_ids.keys()

    def restore_counts(self, keys: list[int], commands_started: int, orphans: int) -> None:
        """Take over the expired-id memory and the counters of the previous image."""
        self._expired_ids.restore(keys)
        self.commands_started = commands_started
        self.reaper.orphans_reaped = orphans

    async def wait_no_spawns(self) -> None:
        """Return once no spawn is under way (as a ``user``, in a worker thread)."""
        while self._starting:
            await next(iter(self._starting.values())).wait()

    def watch_relays(self, live: LiveSession, since: int | None = None) -> None:
        """Register the PTY relays of ``live`` still running with the reaper (they are
        the daemon's children: their statuses are the session's, not orphans')."""
        for pid in (live.output_relay, live.input_relay):
            if pid:
                relay = spawn.Child(pid, -1, None, None, False)
                self.reaper.watch(relay, _relay_watcher(live, pid), since)

    def adopt(self, live: LiveSession) -> None:
        """Take over a session the previous image ran (a live upgrade): its pid is
        already registered with the reaper."""
        self.sessions[live.command_id] = live
        self._expired_ids.discard(live.command_id)
        self._nursery.start_soon(self._supervise, live)

    def adopt_expired(self, live: LiveSession, grace: float) -> None:
        """Take over an expired session a client of the previous image was still reading:
        a reconnect to it is served for ``grace`` seconds or until one attaches; after
        that it is expired for everyone and its output goes with its last reader."""
        command_id = live.command_id
        self.unread[command_id] = live
        self._returning.add(command_id)
        self._nursery.start_soon(self._await_reader, live, grace)

    def hold_unread(self) -> None:
        """A live upgrade is about to close every client: the expired sessions they
        read stay (for the capture) when their clients leave."""
        self._held.update(
            command_id
            for command_id, live in self.unread.items()
            if live.core.attachments or live.core.watchers
        )

    def release_held(self) -> None:
        """The upgrade did not happen: what ``hold_unread`` kept goes with its readers."""
        held = [self.unread[command_id] for command_id in self._held if command_id in self.unread]
        self._held.clear()
        for live in held:
            self._release_if_unread(live)

    def awaits_reader(self, command_id: str) -> bool:
        """Whether the expired session ``command_id`` is kept for a client that comes back
        (carried from the previous image, or held while an upgrade closes its clients)."""
        return command_id in self._returning or command_id in self._held

    async def _await_reader(self, live: LiveSession, grace: float) -> None:
        await trio.sleep(grace)
        if live.command_id in self._returning:  # nobody came back
            self._returning.discard(live.command_id)
            self._release_if_unread(live)

    # ---- clients --------------------------------------------------------------------

    def attach(
        self, live: LiveSession, stdout_offset: int, stderr_offset: int, *, watch: bool = False
    ) -> Attachment:
        """Attach a client (or, with ``watch``, a watcher) at the given offsets."""
        attachment = live.core.attach(
            trio.current_time(), stdout_offset, stderr_offset, watch=watch
        )
        self._returning.discard(live.command_id)  # (a carried expired session: once)
        live.reschedule()
        return attachment

    def detach(self, live: LiveSession, attachment: Attachment, at: float | None = None) -> None:
        """Detach a client (that left ``at``, default now); may kill the command
        (``kill_on_disconnect``). The last reader of a session already gone frees its output."""
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
                if live.core.state is SessionState.RUNNING:
                    await self._run_command(live, nursery)
                await self._run_timers(live, until=live.expired)
                nursery.cancel_scope.cancel()
        finally:
            self._drop(live)
            if live.status is None:  # cancelled while running (daemon stopping)
                self._kill_tree(child.pid, signal.SIGKILL, live.command_id)
            live.notify_changed()

    async def _run_command(self, live: LiveSession, nursery: trio.Nursery) -> None:
        """Pump a running command's output and stdin until it is reaped and drained,
        then finish the session. (A session taken over from the previous image starts
        here with the fds that were still open.)"""
        if live.input_open:
            nursery.start_soon(live.write_stdin)
        # The pumps run in the session's nursery (a nursery of their own cost one more
        # per command); each takes its fd out of ``open_fds`` when it ends, and each
        # waits a bounded time for the EOF of children left behind.
        timing = (self.config.stall_seconds, self.config.drain_seconds)
        for stream, fd in list(live.open_fds.items()):
            nursery.start_soon(live.pump, stream, fd, *timing)
        await self._run_timers(live, until=live.reaped)
        while live.open_fds:
            await live.wait_changed()
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

    def _drop(self, live: LiveSession) -> None:
        """Take the session out of the registry: its TTL ran out (new clients are then
        told it expired), or the daemon stops. Clients still attached read on to the end."""
        if self.sessions.get(live.command_id) is live:
            del self.sessions[live.command_id]
            if live.core.state is SessionState.EXPIRED:
                self._expired_ids.add(live.command_id)
                self.unread[live.command_id] = live
        self._release_if_unread(live)

    def _release_if_unread(self, live: LiveSession) -> None:
        """Free the output of a session out of the registry once no client or watcher reads it."""
        readers = live.core.attachments or live.core.watchers or self.awaits_reader(live.command_id)
        if self.sessions.get(live.command_id) is not live and not readers:
            if self.unread.get(live.command_id) is live:
                del self.unread[live.command_id]
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
        import psutil

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
