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
import os
import resource
import signal
import struct
import subprocess
import termios
import threading
from dataclasses import dataclass

from sandboxd.core import environment, launch
from sandboxd.core.errors import SpawnFailed
from sandboxd.runtime import identity

#: Every catchable classic signal: their dispositions are reset to default in the child,
#: so a daemon that ignores one (SIGPIPE, as Python does) does not pass that on.
_DEFAULT_SIGNALS = frozenset(range(1, 32)) - {signal.SIGKILL, signal.SIGSTOP}
DEFAULT_SIGNALS = _DEFAULT_SIGNALS

#: Where a command too long to be an argument is open in its loader (see core/launch.py).
SCRIPT_FD = 3

#: Held while the process's cwd is changed for a spawn (spawns run in worker threads).
_CWD_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """What to run and how: ``argv`` in ``cwd`` with ``env``.

    A ``[shell, "-c", command]`` argv runs as ``shell -c command`` would, whatever the
    command's length. For ``user`` (``run_config.user``), ``HOME``, ``USER`` and ``LOGNAME``
    become that user's, except those of ``request_env_names`` (the request set them).
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    user: str | None = None
    request_env_names: frozenset[str] = frozenset()
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
    if not request.user:
        return _posix_spawn(request, request.env, None)
    user = identity.resolve_user(request.user)
    own = {name: request.env[name] for name in request.request_env_names if name in request.env}
    home = user.home or request.env.get("HOME", "/")
    env = environment.with_identity(request.env, own, home=home, user_name=user.name)
    if user.is_current():
        return _posix_spawn(request, env, None)
    if identity.THREAD_CREDENTIALS:
        return _posix_spawn(request, env, user)
    return _popen_as_user(request, env, user)


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


def _script(command: str) -> int:
    """A memfd holding ``command``, at its start; close-on-exec, so that no other child
    inherits it (the one it is for gets it by a dup2 or ``pass_fds``)."""
    fd = os.memfd_create("sandboxd-command")
    try:
        view = memoryview(launch.encoded(command))
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        if fd == SCRIPT_FD:  # a dup2 onto itself would leave it close-on-exec
            fd, old = os.dup(fd), fd
            os.close(old)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _posix_spawn(request: SpawnRequest, env: dict[str, str], user: identity.User | None) -> Child:
    argv, script = request.argv, None
    if launch.needs_loader(argv):  # too long to be an argument: see core/launch.py
        argv, script = launch.loader_argv(argv[0], SCRIPT_FD), _script(argv[2])
    try:
        stdio = _open_stdio(request)
    except BaseException:
        if script is not None:
            os.close(script)
        raise
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]]
    if stdio.slave_path is not None:
        # With setsid done first, opening the slave by path (no O_NOCTTY) makes it
        # the child's controlling terminal; dup'ing an inherited fd would not.
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, stdio.slave_path, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        if user is not None:  # the child opens it as the user, as login and sshd chown it
            os.fchown(stdio.child_out, user.uid, -1)
    else:
        if stdio.child_in is None:
            actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
        else:
            actions = [(os.POSIX_SPAWN_DUP2, stdio.child_in, 0)]
        actions += [
            (os.POSIX_SPAWN_DUP2, stdio.child_out, 1),
            (os.POSIX_SPAWN_DUP2, stdio.child_err, 2),
        ]
    if script is not None:  # last: whatever fd 3 was in the child is no longer needed
        actions.append((os.POSIX_SPAWN_DUP2, script, SCRIPT_FD))
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
                with identity.thread_identity(user) if user else contextlib.nullcontext():
                    pid = os.posix_spawn(
                        argv[0],
                        argv,
                        env,
                        file_actions=actions,
                        setsid=True,
                        setsigmask=(),
                        setsigdef=_DEFAULT_SIGNALS,
                    )
            except OSError as exc:
                raise SpawnFailed(f"cannot run {argv[0]!r}: {exc.strerror}") from None
            finally:
                os.chdir("/")
    except BaseException:
        stdio.close_parent_ends()
        raise
    finally:
        stdio.close_child_ends()
        if script is not None:
            os.close(script)
    return Child(pid, stdio.output_fd, stdio.error_fd, stdio.input_fd, request.pty)


def _popen_as_user(request: SpawnRequest, env: dict[str, str], user: identity.User) -> Child:
    """Where per-thread credentials are not known (see identity.py): ``Popen``, whose C
    child does setgroups/setgid/setuid. A PTY is then the command's stdio but not its
    controlling terminal, and only SIGPIPE and SIGXFSZ are reset."""
    argv, scripts = request.argv, []
    if launch.needs_loader(argv):
        scripts = [_script(argv[2])]
        argv = launch.loader_argv(argv[0], scripts[0])
    try:
        stdio = _open_stdio(request)
    except BaseException:
        for fd in scripts:
            os.close(fd)
        raise
    try:
        popen = subprocess.Popen(
            argv,
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
            pass_fds=scripts,
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
        for fd in scripts:
            os.close(fd)
    return Child(popen.pid, stdio.output_fd, stdio.error_fd, stdio.input_fd, request.pty, popen)
