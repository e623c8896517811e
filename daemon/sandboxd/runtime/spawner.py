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
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import outcome
import trio

from sandboxd.core.errors import SpawnFailed
from sandboxd.runtime import process, spawn
from sandboxd.runtime.spawn import Child, SpawnRequest, Stdio

log = logging.getLogger("sandboxd.spawner")

#: The helper's argv[0] (what ``ps`` shows) and the file it is built as, beside this module.
PROGRAM_NAME = "sandboxd-spawner"
PROGRAM = spawn.HELPER_PROGRAM

# Request flags and failure stages, as spawner.c has them.
_FLAG_PTY = 1
_FLAG_NULL_STDIN = 2
_FLAG_SCRIPT = 4
_HEADER = struct.Struct("<IIII")
_REPLY = struct.Struct("<iii")
_STAGE_CHDIR = 3
_STAGE_EXEC = 4
_STAGES = {1: "setsid", 2: "its stdio", 3: "chdir", 4: "exec", 5: "clone"}
#: The largest request the helper reads (spawner.c's MAX_REQUEST); bigger ones, far past
#: what an exec takes anyway, are spawned on the loop, which reports the error.
MAX_REQUEST = 64 << 20
_SLACK = 4096  # the header and the slave's path, with room to spare
#: How ``os.fsencode`` encodes (the request's strings are encoded in one go).
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


class SpawnerGone(SpawnFailed):
    """The helper exited before it answered (killed, or the daemon is stopping)."""


class _NotSent(SpawnerGone):
    """The helper was gone before any of the request reached it: no child was started."""


@dataclass(slots=True)
class _Waiter:
    """A spawn sent to the helper, awaiting its answer."""

    task: trio.lowlevel.Task


class SpawnHelper:
    """The running helper: its pid and the daemon's end of its socket.

    A request reaches the helper whole or not at all as far as a spawn goes: it starts
    nothing until it has read all of one. So a spawn whose send did not finish (the helper
    died, or the socket failed) started nothing and is run on the loop instead; only one
    sent whole and left unanswered is in doubt (``SpawnerGone``).
    """

    def __init__(self, pid: int, channel: socket.socket, reaper: process.Reaper) -> None:
        self.pid = pid
        self._channel = channel
        self._reaper = reaper
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._send_lock = trio.Lock()
        self.running = True  # taking requests
        self.reaped = False
        # What a command's ru_maxrss starts from (its vfork shared the helper's memory):
        # the helper's peak, which grows by at most the largest request (its copy and an
        # 8-byte pointer per string). Kept as an upper bound, not read at every spawn.
        self._base_kib = _peak_rss_kib(pid) + 1024
        self._peak_kib = self._base_kib
        reaper.watch(Child(pid, -1, None, None, False), self._exited)

    @classmethod
    def start(cls, reaper: process.Reaper, program: Path = PROGRAM) -> SpawnHelper | None:
        """Start the helper; None when it is not built, or cannot start (logged)."""
        if not os.access(program, os.X_OK):
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
        # (run() still reads the answers the helper wrote before it died, up to the EOF.)
        self.reaped = True
        self.running = False

    def _fail_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            trio.lowlevel.reschedule(waiter.task, outcome.Error(SpawnerGone("the spawner exited")))

    def _stop_taking_requests(self) -> None:
        """No new requests; the helper does those it has, then exits at the EOF."""
        self.running = False
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop using the helper: the socket is closed (the helper exits at the EOF) and
        spawns still awaiting an answer fail with ``SpawnerGone``. The reaper, if it still
        runs, collects the helper; see ``stop``."""
        self.running = False
        fd = self._channel.fileno()
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)
            self._channel.close()
        self._fail_waiters()

    def stop(self) -> None:
        """``close``, and collect the helper at once, for a daemon that stops (its reaper
        no longer runs): no zombie is left for whoever reaps in this process next."""
        self.close()
        if not self.reaped:  # still our unreaped child: its pid cannot have been reused
            self.reaped = True
            with contextlib.suppress(ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)

    async def run(self) -> None:
        """Hand each answer to the spawn awaiting it, until the helper's EOF; then (or
        when cancelled) close the socket and make sure the helper ends (the reaper
        collects it)."""
        pending = b""
        try:
            while True:
                fd = self._channel.fileno()  # (-1 once closed: never a reused fd number)
                if fd < 0:
                    return
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
                    if not self._waiters:
                        log.error("the spawner helper answered an unasked request")
                        return
                    waiter = self._waiters.popleft()
                    reply = _REPLY.unpack_from(pending, offset)
                    trio.lowlevel.reschedule(waiter.task, outcome.Value(reply))
                pending = pending[whole:]
        except (OSError, trio.ClosedResourceError):
            return
        finally:
            self.close()
            if not self.reaped:  # not yet reaped, so still this helper's pid
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)

    async def spawn(
        self,
        request: SpawnRequest,
        fallback: Callable[[SpawnRequest], Child] = spawn.spawn,
    ) -> Child:
        """Start ``request`` (no ``user``) through the helper, or with ``fallback`` on the
        loop when the helper did not get the whole request; raises ``SpawnFailed``
        (``SpawnerGone`` if it died holding the request: the command may have started).
        Not cancellable: once begun, a spawn is seen through (see spawn.start)."""
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
            size = len(strings) * 2 + len(request.cwd) * 4 + _SLACK  # (argv[0] twice)
            if size > MAX_REQUEST:
                raise _NotSent("too big for the helper")  # (the loop's spawn says why)
            stdio = spawn.open_stdio(request)
        except BaseException:
            if script is not None:
                os.close(script)
            raise
        since = self._reaper.sequence
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
            body = ("\0".join(head) + "\0").encode(_FS_ENCODING, _FS_ERRORS) + strings
            message = _HEADER.pack(len(body), flags, len(argv), len(request.env)) + body
            copy = len(message) + 8 * (len(argv) + len(request.env) + 5)
            self._peak_kib = max(self._peak_kib, self._base_kib + copy // 1024 + 1)
            pid, stage, errno = await self._call(message, fds)
        except BaseException:
            self._let_go(stdio, since)
            raise
        finally:
            stdio.close_child_ends()
            if script is not None:
                os.close(script)
        if stage:
            self._let_go(stdio, since)
            if pid > 0:  # the child that failed is ours to reap: not an orphan
                self._reaper.watch(Child(pid, -1, None, None, False), _ignore, since)
            reason = os.strerror(errno)
            if stage == _STAGE_CHDIR:
                raise SpawnFailed(f"work dir {request.cwd!r}: {reason}")
            if stage == _STAGE_EXEC:
                raise SpawnFailed(f"cannot run {argv[0]!r}: {reason}")
            raise SpawnFailed(f"cannot start {argv[0]!r} ({_STAGES.get(stage, stage)}): {reason}")
        return stdio.child(pid, request.pty, peak_kib=self._peak_kib)

    def _let_go(self, stdio: Stdio, since: int) -> None:
        """Close the daemon's ends of a spawn that did not happen; its PTY relays (which
        then end by themselves) are the reaper's to collect, not orphans."""
        stdio.close_parent_ends()
        for pid in stdio.relays or ():
            self._reaper.watch(Child(pid, -1, None, None, False), _ignore, since)

    async def _call(self, message: bytes, fds: list[int]) -> tuple[int, int, int]:
        """Send one request and await its answer. Raises ``_NotSent`` when the request did
        not reach the helper whole (nothing was started)."""
        if not self.running:
            raise _NotSent("the spawner exited")
        try:
            self._send_lock.acquire_nowait()  # (no checkpoint when no other send is under way)
        except trio.WouldBlock:
            with trio.CancelScope(shield=True):  # (open_stdio has run: see it through)
                await self._send_lock.acquire()
        try:
            if not self.running:
                raise _NotSent("the spawner exited")
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            view = memoryview(message)
            while view:
                fd = self._channel.fileno()
                if fd < 0:
                    raise _NotSent("the spawner exited")
                try:
                    sent = self._channel.sendmsg([view], ancillary)
                except BlockingIOError:
                    with trio.CancelScope(shield=True):
                        await trio.lowlevel.wait_writable(fd)
                    continue
                ancillary = []  # (the fds went with the first byte)
                view = view[sent:]
        except (OSError, trio.ClosedResourceError) as exc:
            # Not all of it reached the helper: it starts nothing from a part. A part
            # already sent would be taken for the start of the next request: no more.
            self._stop_taking_requests()
            raise _NotSent(f"the spawner is gone: {exc}") from None
        finally:
            self._send_lock.release()
        self._waiters.append(_Waiter(trio.lowlevel.current_task()))

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # sent: the spawn happens, and is awaited

        result = await trio.lowlevel.wait_task_rescheduled(abort)
        assert isinstance(result, tuple)
        return result


def _ignore(_status: object) -> None:
    pass


def _peak_rss_kib(pid: int) -> int:
    """``VmHWM`` of ``pid`` in KiB (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            status = handle.read()
        start = status.index(b"VmHWM:") + 6
        return int(status[start : status.index(b"kB", start)])
    except (OSError, ValueError):
        return 0


def _argv_and_env(argv: list[str], env: dict[str, str]) -> bytes:
    """``argv`` and ``env`` as the request's NUL-terminated strings, encoded as
    ``os.fsencode`` would; raises ``ValueError`` as ``posix_spawn`` does for a NUL inside
    one or an ``=`` in a variable's name. (One join and one encode for all of them: this
    runs for every command, with the whole environment.)"""
    if "" in env or "=" in "\0".join(env):  # (then look closer: "=x" is a fine name)
        for name in env:
            if not name or "=" in name[1:]:
                raise ValueError("illegal environment variable name")
    text = "\0".join(argv) + "\0"
    if env:
        text += "\0".join(map("=".join, env.items())) + "\0"
    if text.count("\0") != len(argv) + len(env):
        raise ValueError("embedded null byte")
    return text.encode(_FS_ENCODING, _FS_ERRORS)


def collect_old_helpers(reaper: process.Reaper) -> int:
    """Register with ``reaper`` (as not orphans) and SIGKILL the helpers a previous image
    of this process started; how many. (A live upgrade's exec closed their sockets, so
    they exit at the EOF: most are zombies by now, whose cmdline is empty, so they are
    known by their ``comm``, which the kernel cuts to 15 characters.)"""
    me, found = os.getpid(), 0
    comm = b"(" + PROGRAM_NAME.encode()[:15] + b")"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        end = stat.rfind(b")") + 1
        if stat[stat.find(b"(") : end] != comm or int(stat[end + 1 :].split()[1]) != me:
            continue
        reaper.watch(Child(int(name), -1, None, None, False), _ignore)
        with contextlib.suppress(OSError):
            os.kill(int(name), signal.SIGKILL)
        found += 1
    return found
