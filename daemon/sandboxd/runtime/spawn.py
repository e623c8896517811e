"""Starting commands: pipes or a PTY, as the daemon's user or another, with clean hygiene.

The rules (design.md, "Processes"):

* Spawning happens in a worker thread; the caller registers the pid with the ``Reaper``
  (``process.py``) as soon as ``spawn`` returns, passing the reaper's sequence number read
  before the spawn began, so a child that exits at once still reaches its owner.
* Children start in a new session (``setsid``), so the command's process group id is its
  pid; every signal disposition and the signal mask are reset; only fds 0-2 survive (all
  other fds in this process are close-on-exec, as Python makes them by default).
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass

from sandboxd.core.errors import InvalidRequest, SpawnFailed

#: Every catchable classic signal: their dispositions are reset to default in the child,
#: so a daemon that ignores one (SIGPIPE, as Python does) does not pass that on.
_DEFAULT_SIGNALS = frozenset(range(1, 32)) - {signal.SIGKILL, signal.SIGSTOP}

#: Held while the process's cwd is changed for a spawn (spawns run in worker threads).
_CWD_LOCK = threading.Lock()


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
