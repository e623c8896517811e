"""The spawner helper: a small C program (``spawner.c``) that starts commands off the loop.

``os.posix_spawn`` is a vfork: the daemon's only thread waits until the child has exec'd,
about 0.15 ms on an idle machine and about 1 ms under load (the child waits for a CPU),
and the event loop waits with it. The helper, a child of the daemon started at start-up,
clones each command with ``CLONE_PARENT``: the command is the daemon's own child (reaped,
signalled and carried across an upgrade as before), and the loop goes on meanwhile.

The daemon keeps the work it did before: the pipes or the PTY, the environment, the
loader script (``spawn.open_stdio``, ``spawn.prepared_argv``); it sends them (the fds by
``SCM_RIGHTS``) and awaits the pid. Requests are pipelined; the helper answers them in
order, and one task (``SpawnHelper.run``) hands each answer to its caller. A spawn, once
sent, is never abandoned: its caller waits for the answer uncancellably (the helper
answers within the time of a spawn).

Without the helper (not built, or it died) commands are spawned on the loop, as before;
``spawn.start`` decides.
"""

from __future__ import annotations

import array
import collections
import contextlib
import logging
import os
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import outcome
import trio

from sandboxd.core.errors import SpawnFailed
from sandboxd.runtime import process, reexec, spawn
from sandboxd.runtime.spawn import Child, SpawnRequest

log = logging.getLogger("sandboxd.spawner")

#: The helper's argv[0] (what ``ps`` shows) and the file it is built as, beside this module.
PROGRAM_NAME = "sandboxd-spawner"
PROGRAM = Path(__file__).with_name(PROGRAM_NAME)

# Request flags and failure stages, as spawner.c has them.
_FLAG_PTY = 1
_FLAG_NULL_STDIN = 2
_FLAG_SCRIPT = 4
_HEADER = struct.Struct("<IIII")
_REPLY = struct.Struct("<iii")
_STAGE_CHDIR = 3
_STAGE_EXEC = 4
_STAGES = {1: "setsid", 2: "its stdio", 3: "chdir", 4: "exec", 5: "clone"}


class SpawnerGone(SpawnFailed):
    """The helper exited before it answered (killed, or the daemon is stopping)."""


class _NotSent(SpawnerGone):
    """The helper was gone before any of the request reached it: no child was started."""


@dataclass(slots=True)
class _Waiter:
    """A spawn sent to the helper, awaiting its answer."""

    task: trio.lowlevel.Task


class SpawnHelper:
    """The running helper: its pid and the daemon's end of its socket."""

    def __init__(self, pid: int, channel: socket.socket, reaper: process.Reaper) -> None:
        self.pid = pid
        self._channel = channel
        self._reaper = reaper
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._send_lock = trio.Lock()
        self.running = True
        self.reaped = False
        reaper.watch(Child(pid, -1, None, None, False), self._exited)

    @classmethod
    def start(cls, reaper: process.Reaper, program: Path = PROGRAM) -> SpawnHelper | None:
        """Start the helper, or None when it is not built or cannot start (logged)."""
        if not os.access(program, os.X_OK):
            log.info("no spawner helper (%s not built): spawning on the event loop", program)
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.posix_spawn(
                str(program),
                [PROGRAM_NAME],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                ],
                setsid=True,
                setsigmask=(),
                setsigdef=spawn.DEFAULT_SIGNALS,
            )
        except OSError as exc:
            ours.close()
            log.warning("cannot start the spawner helper: %s; spawning on the event loop", exc)
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(pid, ours, reaper)

    def _exited(self, _status: object) -> None:
        self.reaped = True
        self.close()

    def _fail_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            trio.lowlevel.reschedule(waiter.task, outcome.Error(SpawnerGone("the spawner exited")))

    def stop(self) -> None:
        """End the helper and collect it, for a daemon that stops (its reaper no longer
        runs): no zombie is left behind for whoever reaps in this process next."""
        self.close()
        if not self.reaped:  # still our unreaped child: its pid cannot have been reused
            self.reaped = True
            with contextlib.suppress(ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)

    def close(self) -> None:
        """Stop using the helper; it exits at the EOF."""
        self.running = False
        if self._channel.fileno() >= 0:
            trio.lowlevel.notify_closing(self._channel.fileno())
            self._channel.close()
        self._fail_waiters()

    async def run(self) -> None:
        """Hand each answer to the spawn awaiting it, until the helper's EOF; then (or
        when cancelled) end and collect the helper."""
        fd = self._channel.fileno()
        pending = b""
        try:
            while True:
                try:
                    data = os.read(fd, _REPLY.size * 256)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                if not data:
                    log.warning("the spawner helper exited; spawning on the event loop")
                    return
                pending += data
                whole = len(pending) - len(pending) % _REPLY.size
                for offset in range(0, whole, _REPLY.size):
                    waiter = self._waiters.popleft()
                    reply = _REPLY.unpack_from(pending, offset)
                    trio.lowlevel.reschedule(waiter.task, outcome.Value(reply))
                pending = pending[whole:]
        except (OSError, trio.ClosedResourceError):
            return
        finally:
            self.stop()

    async def spawn(
        self,
        request: SpawnRequest,
        fallback: Callable[[SpawnRequest], Child] = spawn.spawn,
    ) -> Child:
        """Start ``request`` (no ``user``) through the helper, or with ``fallback`` on the
        loop if the helper is gone before it got the request; raises ``SpawnFailed``
        (``SpawnerGone`` if it died holding the request: the command may have started)."""
        try:
            return await self._spawn(request)
        except _NotSent:
            return fallback(request)

    async def _spawn(self, request: SpawnRequest) -> Child:
        argv, script = spawn.prepared_argv(request)
        try:
            strings = _argv_and_env(argv, request.env)  # (first: it may raise ValueError)
            if "\0" in request.cwd:
                raise ValueError("embedded null byte")
            stdio = spawn.open_stdio(request)
        except BaseException:
            if script is not None:
                os.close(script)
            raise
        try:
            flags, fds = 0, []
            if stdio.slave_path is not None:
                flags |= _FLAG_PTY
            else:
                if stdio.child_in is None:
                    flags |= _FLAG_NULL_STDIN
                else:
                    fds.append(stdio.child_in)
                fds += [stdio.child_out, stdio.child_err]
            if script is not None:
                flags |= _FLAG_SCRIPT
                fds.append(script)
            head = [argv[0], request.cwd] + ([stdio.slave_path] if stdio.slave_path else [])
            body = b"".join(os.fsencode(part) + b"\0" for part in head) + strings
            message = _HEADER.pack(len(body), flags, len(argv), len(request.env)) + body
            since = self._reaper.sequence
            pid, stage, errno = await self._call(message, fds)
        except BaseException:
            stdio.close_parent_ends()
            raise
        finally:
            stdio.close_child_ends()
            if script is not None:
                os.close(script)
        if stage:
            stdio.close_parent_ends()
            if pid > 0:  # the child that failed is ours to reap: not an orphan
                self._reaper.watch(Child(pid, -1, None, None, False), _ignore, since)
            reason = os.strerror(errno)
            if stage == _STAGE_CHDIR:
                raise SpawnFailed(f"work dir {request.cwd!r}: {reason}")
            if stage == _STAGE_EXEC:
                raise SpawnFailed(f"cannot run {argv[0]!r}: {reason}")
            raise SpawnFailed(f"cannot start {argv[0]!r} ({_STAGES.get(stage, stage)}): {reason}")
        return stdio.child(pid, request.pty)

    async def _call(self, message: bytes, fds: list[int]) -> tuple[int, int, int]:
        """Send one request and await its answer (uncancellably once anything is sent)."""
        if not self.running:
            raise _NotSent("the spawner exited")
        try:
            self._send_lock.acquire_nowait()  # (no checkpoint when no other send is under way)
        except trio.WouldBlock:
            await self._send_lock.acquire()
        waiter = _Waiter(trio.lowlevel.current_task())
        try:
            fd = self._channel.fileno()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            view = memoryview(message)
            while view:
                try:
                    sent = self._channel.sendmsg([view], ancillary)
                except BlockingIOError:
                    with trio.CancelScope(shield=ancillary == []):
                        await trio.lowlevel.wait_writable(fd)
                    continue
                if ancillary:  # the fds went with the first byte: now this must finish
                    self._waiters.append(waiter)
                    ancillary = []
                view = view[sent:]
        except OSError as exc:
            sent = waiter in self._waiters
            if sent:
                self._waiters.remove(waiter)
            self.close()
            gone = SpawnerGone if sent else _NotSent
            raise gone(f"the spawner is gone: {exc}") from None
        finally:
            self._send_lock.release()

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # sent: the spawn happens, and is awaited

        result = await trio.lowlevel.wait_task_rescheduled(abort)
        assert isinstance(result, tuple)
        return result


def _ignore(_status: object) -> None:
    pass


def _argv_and_env(argv: list[str], env: dict[str, str]) -> bytes:
    """``argv`` and ``env`` as the request's NUL-terminated strings; raises ``ValueError``
    as ``posix_spawn`` does for a NUL inside one or an ``=`` in a variable's name."""
    parts = [os.fsencode(arg) for arg in argv]
    for name, value in env.items():
        if not name or "=" in name[1:]:
            raise ValueError("illegal environment variable name")
        parts.append(os.fsencode(f"{name}={value}"))
    strings = b"\0".join(parts) + b"\0"
    if strings.count(b"\0") != len(parts):
        raise ValueError("embedded null byte")
    return strings


def collect_old_helpers(reaper: process.Reaper) -> int:
    """Register with ``reaper`` (as not orphans) and SIGKILL the helpers a previous image
    of this process started (a live upgrade's exec closed their sockets: they exit at the
    EOF anyway); how many."""
    me, found = os.getpid(), 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or reexec.parent_of(int(name)) != me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                if cmdline.read() != PROGRAM_NAME.encode() + b"\0":
                    continue
        except OSError:
            continue
        reaper.watch(Child(int(name), -1, None, None, False), _ignore)
        with contextlib.suppress(OSError):
            os.kill(int(name), signal.SIGKILL)
        found += 1
    return found
