"""The supervisor's sessions to and from the handover state (both images).

``capture`` runs in the old image's final synchronous stretch (no await); ``rebuild``
runs in the new image before the reaper's first pass, and registers every pid that was
not reaped yet, so a child that exited during the swap is reaped with its exact status.
"""

from __future__ import annotations

import os
import stat

from sandboxd.core.carry import (
    restore_core,
    restore_exit,
    restore_ring,
    snapshot_core,
    snapshot_exit,
    snapshot_ring,
)
from sandboxd.core.handover import SessionRecord, StreamState
from sandboxd.core.session import SessionState, Stream
from sandboxd.core.utf8 import Utf8Sanitizer
from sandboxd.runtime import reexec, spawn
from sandboxd.runtime.live import LiveSession
from sandboxd.runtime.supervisor import Supervisor


def _stream(live: LiveSession, stream: Stream) -> StreamState:
    fd = live.open_fds.get(stream, -1)
    sanitizer = live.sanitizers.get(stream)
    carry = sanitizer.held() if sanitizer is not None and fd >= 0 else b""
    return StreamState(ring=snapshot_ring(live.core.ring(stream)), fd=fd, carry=carry)


def capture(supervisor: Supervisor, now: float) -> list[SessionRecord]:
    """Every session in the registry, and every expired one a client still reads, as it
    is at this instant."""
    records: list[SessionRecord] = []
    for live in [*supervisor.sessions.values(), *supervisor.unread.values()]:
        core = live.core
        read = core.attachments or core.watchers or supervisor.awaits_reader(live.command_id)
        if core.state is SessionState.EXPIRED and not read:
            continue
        pending, closing, terminal_open = live.stdin_state()
        running = core.state is SessionState.RUNNING
        records.append(
            SessionRecord(
                core=snapshot_core(core, now),
                command=live.command,
                pty=live.child.pty,
                started_wall=live.started_wall,
                stdout=_stream(live, Stream.STDOUT),
                stderr=_stream(live, Stream.STDERR),
                proc_start_ticks=reexec.start_ticks(core.pid) if live.status is None else 0,
                ended_wall=live.ended_wall,
                reaped=snapshot_exit(live.status) if running and live.status else None,
                input_fd=live.child.input_fd if live.input_open and live.child.input_fd else -1,
                stdin_pending=pending,
                stdin_closing=closing,
                terminal_open=terminal_open,
                spawner_peak_kib=live.child.spawner_peak_kib,
                terminal_fd=-1 if live.terminal_fd is None else live.terminal_fd,
                output_relay=live.output_relay,
                input_relay=live.input_relay,
            )
        )
    return records


def carried_fds(records: list[SessionRecord]) -> list[int]:
    """The fds the records claim."""
    fds: list[int] = []
    for record in records:
        claimed = (record.stdout.fd, record.stderr.fd, record.input_fd, record.terminal_fd)
        fds += [fd for fd in claimed if fd >= 0]
    return fds


def check_fds(records: list[SessionRecord]) -> None:
    """Raise ``ValueError`` unless every claimed fd is open here and of its kind (a FIFO
    for pipe ends, also a relayed PTY's, a character device for a PTY master) and none is
    claimed twice."""
    seen: set[int] = set()
    for record in records:
        direct = record.pty and not record.relayed
        # A relayed PTY's input is the master (or, from an image that relayed it too, a
        # pipe to its input relay).
        either = {record.input_fd} if record.relayed else set()
        streams = (record.stdout.fd, record.stderr.fd, record.input_fd)
        claimed = [(fd, direct) for fd in streams]
        claimed.append((record.terminal_fd, True))
        for fd, terminal in claimed:
            if fd < 0:
                continue
            if fd in seen or fd <= 2:
                raise ValueError(f"fd {fd} claimed twice or a standard fd")
            seen.add(fd)
            mode = os.fstat(fd).st_mode  # OSError: not open
            if fd in either and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
                continue
            if not (stat.S_ISCHR(mode) if terminal else stat.S_ISFIFO(mode)):
                raise ValueError(f"fd {fd} of {record.core.command_id} is not its pipe/PTY")


def check_pids(records: list[SessionRecord], parent: int, *, gone_ok: bool = False) -> None:
    """Raise ``ValueError`` unless every pid not reaped yet is a child of ``parent`` that
    started when recorded (a zombie is fine). ``gone_ok``: a pid that no longer exists
    is fine (the pre-flight: the daemon reaps on while its candidate checks)."""
    for record in records:
        for relay in (record.output_relay, record.input_relay):
            found = reexec.parent_of(relay) if relay else parent
            if found != parent and not (found == 0 and gone_ok):
                raise ValueError(f"PTY relay {relay} of {record.core.command_id} is not a child")
        if record.core.state != "running" or record.reaped is not None:
            continue
        pid = record.core.pid
        found = reexec.parent_of(pid)
        if found == 0 and gone_ok:
            continue
        if found != parent:
            raise ValueError(f"pid {pid} of {record.core.command_id} is not a child")
        ticks = record.proc_start_ticks
        if ticks and reexec.start_ticks(pid) != ticks:
            raise ValueError(f"pid {pid} of {record.core.command_id} is another process")


def rebuild(supervisor: Supervisor, records: list[SessionRecord], now: float) -> list[LiveSession]:
    """The live sessions of ``records`` (``now``: the restore time, the swap already
    taken off), each running pid registered with the supervisor's reaper; the caller
    adopts them (``Supervisor.adopt``) before the reaper's first pass."""
    pool = supervisor.pool
    lives: list[LiveSession] = []
    for record in records:
        stdout = restore_ring(record.stdout.ring, pool.ring(record.stdout.ring.capacity))
        stderr = restore_ring(record.stderr.ring, pool.ring(record.stderr.ring.capacity))
        core = restore_core(record.core, now, stdout, stderr)
        child = spawn.Child(
            pid=core.pid,
            output_fd=record.stdout.fd,
            error_fd=None if record.pty else record.stderr.fd,
            input_fd=record.input_fd if record.input_fd >= 0 else None,
            pty=record.pty,
            terminal_fd=record.terminal_fd if record.terminal_fd >= 0 else None,
        )
        child.spawner_peak_kib = record.spawner_peak_kib
        if record.relayed:
            child.relays = (record.output_relay, record.input_relay)
        live = LiveSession(core, child, record.command)
        supervisor.watch_relays(live)
        live.started_wall = record.started_wall
        live.ended_wall = record.ended_wall
        live.open_fds = {
            stream: state.fd
            for stream, state in ((Stream.STDOUT, record.stdout), (Stream.STDERR, record.stderr))
            if state.fd >= 0
        }
        for stream, state in ((Stream.STDOUT, record.stdout), (Stream.STDERR, record.stderr)):
            if state.fd >= 0:
                sanitizer = Utf8Sanitizer()
                sanitizer.hold(state.carry)
                live.sanitizers[stream] = sanitizer
        live.input_open = child.input_fd is not None
        live.restore_stdin(record.stdin_pending, record.stdin_closing, record.terminal_open)
        if core.state in (SessionState.FINISHED, SessionState.EXPIRED):
            assert core.status is not None
            live.on_reaped(core.status)
            pool.retire(stdout)
            pool.retire(stderr)
        elif record.reaped is not None:
            live.on_reaped(restore_exit(record.reaped))
        else:
            supervisor.reaper.watch(child, live.on_reaped)
        lives.append(live)
    return lives
