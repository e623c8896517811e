"""Spawning commands, the single reaper, signals, and killing whole process trees.

The rules (design.md, "Processes"):

* sandboxd is the only caller of ``wait*()`` in its process: the ``Reaper`` loops
  ``wait4(-1, WNOHANG)`` on SIGCHLD and on a 1 s safety timer and hands each status to
  whoever registered the pid. ``trio.Process``, ``subprocess.run`` or ``Popen.wait`` would
  reap behind its back and steal exit codes.
* Spawning happens synchronously on the trio thread and the pid is registered before the
  next checkpoint, so the reaper can never see a pid nobody claims.
* Children start in a new session (``setsid``), so the command's process group id is its
  pid; every signal disposition and the signal mask are reset; only fds 0-2 survive (all
  other fds in this process are close-on-exec, as Python makes them by default).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import grp
import os
import pwd
import resource
import signal
import struct
import subprocess
import termios
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import trio

from sandboxd.core.errors import InvalidRequest, SpawnFailed
from sandboxd.core.session import ExitStatus

#: Every catchable classic signal: their dispositions are reset to default in the child,
#: so a daemon that ignores one (SIGPIPE, as Python does) does not pass that on.
_DEFAULT_SIGNALS = frozenset(range(1, 32)) - {signal.SIGKILL, signal.SIGSTOP}

#: Held while the process's cwd is changed for a spawn (spawns run in worker threads).
_CWD_LOCK = threading.Lock()

#: Every command's environment names its session: how escapees are found (see kill_tree).
COMMAND_ID_VARIABLE = "SANDBOXD_COMMAND_ID"

_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """What to run and how: ``argv`` in ``cwd`` with exactly ``env``."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    user: str | None = None
    pty: bool = False
    close_stdin: bool = False
    cols: int = 80
    rows: int = 24


@dataclass(eq=False, slots=True)
class Child:
    """A started command. ``output_fd`` is the PTY master for a PTY command.

    The fds belong to the caller, which must close them. ``popen`` is kept only so that
    the reaper can mark it reaped; its wait/poll are never called.
    """

    pid: int
    output_fd: int
    error_fd: int | None
    input_fd: int | None
    pty: bool
    popen: subprocess.Popen[bytes] | None = None
    spawner_peak_kib: int = 0  # the daemon's own peak RSS when it spawned this child

    def __post_init__(self) -> None:
        self.spawner_peak_kib = own_peak_rss_kib()


def own_peak_rss_kib() -> int:
    """The daemon's peak RSS in KiB: ``VmHWM``, the high-water mark of its own memory.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: that one keeps, across exec, the peak of
    whatever process spawned the daemon (a test runner, say), which is not what a
    vfork-spawned command inherits from the daemon.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def close_inherited_fds_on_exec() -> None:
    """Mark every fd above 2 close-on-exec.

    Python opens its own fds close-on-exec, but fds inherited from whoever started the
    daemon (a shell, make, a CI runner) are not, and would reach every command.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own fd is gone by now
                os.set_inheritable(fd, False)


def set_window_size(fd: int, cols: int, rows: int) -> None:
    """Set a PTY's window size (on the master); the kernel then SIGWINCHes its foreground."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def spawn(request: SpawnRequest) -> Child:
    """Start ``request`` and return its pid and fds; raises ``SpawnFailed``.

    Blocks until the child has exec'd (or failed to): call it in a worker thread and
    register the pid with ``Reaper.watch(..., since=)`` as soon as it returns.
    """
    if request.user:
        return _spawn_as_user(request, _resolve_user(request.user))
    return _posix_spawn(request)


@dataclass(slots=True)
class _Stdio:
    """The fds of a child about to start: the daemon's ends and the child's."""

    output_fd: int  # stdout, or the PTY master
    error_fd: int | None
    input_fd: int | None
    child_in: int | None  # None: /dev/null
    child_out: int
    child_err: int
    slave_path: str | None  # the PTY slave, opened by path in the child
    parent_fds: list[int]
    child_fds: list[int]

    def close_parent_ends(self) -> None:
        for fd in self.parent_fds:
            os.close(fd)

    def close_child_ends(self) -> None:
        for fd in self.child_fds:
            os.close(fd)


def _open_stdio(request: SpawnRequest) -> _Stdio:
    parent: list[int] = []
    child: list[int] = []
    try:
        if request.pty:
            master, slave = os.openpty()
            parent.append(master)
            child.append(slave)
            set_window_size(master, request.cols, request.rows)  # never start at 0x0
            terminal_input = os.dup(master)
            parent.append(terminal_input)
            return _Stdio(
                master, None, terminal_input, slave, slave, slave, os.ttyname(slave), parent, child
            )
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        parent += [out_r, err_r]
        child += [out_w, err_w]
        child_in: int | None = None
        input_fd: int | None = None
        if not request.close_stdin:
            child_in, input_fd = os.pipe()
            parent.append(input_fd)
            child.append(child_in)
        return _Stdio(out_r, err_r, input_fd, child_in, out_w, err_w, None, parent, child)
    except BaseException:
        for fd in parent + child:
            os.close(fd)
        raise


def _posix_spawn(request: SpawnRequest) -> Child:
    stdio = _open_stdio(request)
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]]
    if stdio.slave_path is not None:
        # With setsid done first, opening the slave by path (no O_NOCTTY) makes it
        # the child's controlling terminal; dup'ing an inherited fd would not.
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, stdio.slave_path, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
    else:
        if stdio.child_in is None:
            actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
        else:
            actions = [(os.POSIX_SPAWN_DUP2, stdio.child_in, 0)]
        actions += [
            (os.POSIX_SPAWN_DUP2, stdio.child_out, 1),
            (os.POSIX_SPAWN_DUP2, stdio.child_err, 2),
        ]
    try:
        # posix_spawn has no chdir action in Python, so the daemon (whose own cwd is
        # "/" and which uses no relative paths) steps into the work dir for the spawn;
        # the lock keeps spawns in different worker threads from crossing.
        with _CWD_LOCK:
            try:
                os.chdir(request.cwd)
            except OSError as exc:
                raise SpawnFailed(f"work dir {request.cwd!r}: {exc.strerror}") from None
            try:
                pid = os.posix_spawn(
                    request.argv[0],
                    request.argv,
                    request.env,
                    file_actions=actions,
                    setsid=True,
                    setsigmask=(),
                    setsigdef=_DEFAULT_SIGNALS,
                )
            except OSError as exc:
                raise SpawnFailed(f"cannot run {request.argv[0]!r}: {exc.strerror}") from None
            finally:
                os.chdir("/")
    except BaseException:
        stdio.close_parent_ends()
        raise
    finally:
        stdio.close_child_ends()
    return Child(pid, stdio.output_fd, stdio.error_fd, stdio.input_fd, request.pty)


@dataclass(frozen=True, slots=True)
class _User:
    uid: int
    gid: int
    groups: list[int]
    name: str | None
    home: str | None


def _resolve_user(spec: str) -> _User:
    """``name``, ``uid``, ``name:group`` or ``uid:gid`` -> ids; raises ``SpawnFailed``."""
    user_part, _, group_part = spec.partition(":")
    if not user_part:
        raise InvalidRequest(f"user {spec!r} names no user")
    try:
        entry = pwd.getpwuid(int(user_part)) if user_part.isdigit() else pwd.getpwnam(user_part)
    except KeyError:
        if not user_part.isdigit():
            raise SpawnFailed(f"unknown user {user_part!r}") from None
        entry = None
    uid = entry.pw_uid if entry else int(user_part)
    gid = entry.pw_gid if entry else uid
    if group_part:
        try:
            gid = int(group_part) if group_part.isdigit() else grp.getgrnam(group_part).gr_gid
        except KeyError:
            raise SpawnFailed(f"unknown group {group_part!r}") from None
    if entry is None:
        return _User(uid, gid, [gid], None, None)
    return _User(uid, gid, os.getgrouplist(entry.pw_name, gid), entry.pw_name, entry.pw_dir)


def _spawn_as_user(request: SpawnRequest, user: _User) -> Child:
    """Start as another user through ``Popen`` (its C child does setgroups/setgid/setuid).

    A PTY started this way is the command's stdio but not its controlling terminal.
    """
    env = dict(request.env)
    if user.name and "USER" not in env:
        env["USER"] = env["LOGNAME"] = user.name
    stdio = _open_stdio(request)
    try:
        popen = subprocess.Popen(
            request.argv,
            stdin=subprocess.DEVNULL if stdio.child_in is None else stdio.child_in,
            stdout=stdio.child_out,
            stderr=stdio.child_err,
            cwd=request.cwd,
            env=env,
            user=user.uid,
            group=user.gid,
            extra_groups=user.groups,
            start_new_session=True,
            close_fds=True,
            restore_signals=True,
        )
    except OSError as exc:
        stdio.close_parent_ends()
        raise SpawnFailed(f"cannot start as {user.uid}: {exc}") from None
    except BaseException:
        stdio.close_parent_ends()
        raise
    finally:
        stdio.close_child_ends()
    return Child(popen.pid, stdio.output_fd, stdio.error_fd, stdio.input_fd, request.pty, popen)


def exit_status(status: int, usage: object, spawner_peak_kib: int = 0) -> ExitStatus:
    """A ``wait4`` result as an ``ExitStatus``: 128+N for a death by signal N.

    A vfork-style spawn runs the child in the daemon's memory until its exec, and Linux
    then counts the daemon's peak RSS into the child's ``ru_maxrss``. A value no higher
    than the daemon's peak at spawn time therefore says only "at most this much", and
    is reported as unknown (None); a higher one is the command's real peak.
    """
    cpu = float(getattr(usage, "ru_utime", 0.0)) + float(getattr(usage, "ru_stime", 0.0))
    maxrss_kib = int(getattr(usage, "ru_maxrss", 0))
    rss = maxrss_kib * 1024 if maxrss_kib > spawner_peak_kib else None
    if os.WIFSIGNALED(status):
        signo = os.WTERMSIG(status)
        return ExitStatus(128 + signo, signo, cpu, rss)
    return ExitStatus(os.waitstatus_to_exitcode(status), None, cpu, rss)


class Reaper:
    """The one place that waits for children; see the module docstring.

    Children are spawned in a worker thread (so an exec does not stall the event loop),
    which means one can exit, and be reaped, before its pid is registered. The status
    of an unclaimed pid is therefore kept for a while with the reaper's sequence number
    at the time; ``watch`` accepts it only if it was reaped after the spawn began, so a
    stale status of an orphan that once had the same pid is never handed out.
    """

    EARLY_KEPT = 10_000

    def __init__(self) -> None:
        self._owners: dict[int, Callable[[ExitStatus], None]] = {}
        self._popens: dict[int, subprocess.Popen[bytes]] = {}
        self._spawner_peaks: dict[int, int] = {}
        self._unclaimed: OrderedDict[int, tuple[int, int, object]] = OrderedDict()
        self.sequence = 0  # how many children have been reaped
        self.orphans_reaped = 0

    def watch(
        self, child: Child, on_exit: Callable[[ExitStatus], None], since: int | None = None
    ) -> None:
        """Call ``on_exit`` (on the trio thread) when ``child`` is reaped.

        ``since`` is ``sequence`` read before the spawn began; with it, a status the
        reaper collected in between is delivered at once.
        """
        early = self._unclaimed.pop(child.pid, None)
        if early is not None:
            reaped_at, status, usage = early
            if since is not None and reaped_at > since:
                self.orphans_reaped -= 1
                result = exit_status(status, usage, child.spawner_peak_kib)
                if child.popen is not None:
                    child.popen.returncode = result.code
                on_exit(result)
                return
        self._owners[child.pid] = on_exit
        self._spawner_peaks[child.pid] = child.spawner_peak_kib
        if child.popen is not None:
            self._popens[child.pid] = child.popen

    @property
    def watched(self) -> int:
        """How many children are still awaited."""
        return len(self._owners)

    def reap_all(self) -> None:
        """Collect every child that has exited; never blocks."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.sequence += 1
            owner = self._owners.pop(pid, None)
            if owner is None:
                self.orphans_reaped += 1
                self._unclaimed[pid] = (self.sequence, status, usage)
                while len(self._unclaimed) > self.EARLY_KEPT:
                    self._unclaimed.popitem(last=False)
                continue
            popen = self._popens.pop(pid, None)
            result = exit_status(status, usage, self._spawner_peaks.pop(pid, 0))
            if popen is not None:
                popen.returncode = result.code
            owner(result)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap on every SIGCHLD, and once a second in case one was coalesced or missed."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            while True:
                self.reap_all()
                with trio.move_on_after(1.0):
                    await signals.__anext__()


def become_subreaper() -> bool:
    """Adopt orphaned descendants (as PID 1 does), so that they are reaped here.

    A daemon a command leaves behind (``setsid cmd &``) is then re-parented to sandboxd
    instead of to the container's init, and the single reaper collects it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def tagged_processes(command_ids: set[str]) -> dict[str, list[psutil.Process]]:
    """Processes whose environment carries ``SANDBOXD_COMMAND_ID`` for one of the ids.

    This finds what left a command's process group and tree (``setsid``, ``nohup``, a
    double fork): the environment it started with still names its session.
    """
    wanted = {f"{COMMAND_ID_VARIABLE}={cid}".encode(): cid for cid in command_ids}
    found: dict[str, list[psutil.Process]] = {}
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                entries = handle.read().split(b"\0")
            for entry in entries:
                cid = wanted.get(entry)
                if cid is not None:
                    found.setdefault(cid, []).append(psutil.Process(int(name)))
                    break
        except (OSError, psutil.Error):
            continue
    return found


def kill_tree(pid: int, signo: int = signal.SIGKILL, command_id: str | None = None) -> None:
    """Signal the process group led by ``pid``, every descendant still linked to it,
    and (given ``command_id``) every process that escaped them but carries the tag.

    Descendants are listed before the group is signalled, so that children which left
    the group (``setsid``) but are still below the leader are found too.
    """
    try:
        targets = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        targets = []
    if command_id is not None:
        targets += tagged_processes({command_id}).get(command_id, [])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signo)
    for process in targets:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signo)  # psutil checks the pid still means that process


def signal_group(pid: int, signo: int) -> None:
    """Send ``signo`` to the command's process group (gone already: nothing happens)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signo)


def parse_signal(value: str | int) -> int:
    """``"INT"``, ``"SIGINT"``, ``"int"`` or ``2`` -> 2; raises ``InvalidRequest``."""
    if isinstance(value, int):
        if value in signal.valid_signals() and value != 0:
            return value
        raise InvalidRequest(f"no signal numbered {value}")
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidRequest(f"unknown signal {value!r}") from None
