"""Starting commands: pipes or a PTY, as the daemon's user or another, with clean hygiene.

The rules (design.md, "Processes"):

* Spawning happens on the event loop, or in a worker thread for a ``user`` (``start``);
  the caller registers the pid with the ``Reaper`` (``process.py``) as soon as ``spawn``
  returns, passing the reaper's sequence number read before the spawn began, so a child
  that exits at once still reaches its owner.
* Children start in a new session (``setsid``), so the command's process group id is its
  pid; every signal disposition and the signal mask are reset; only fds 0-2 survive (all
  other fds in this process are close-on-exec, as Python makes them by default).
* A PTY command's output and input pass through two relay processes (``cat``), so that
  the daemon reads and writes pipes, never the master (see "PTY relays" below).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import resource
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from sandboxd.core import environment, launch
from sandboxd.core.errors import SpawnFailed
from sandboxd.runtime import identity, pipesize, reexec

if TYPE_CHECKING:
    from sandboxd.runtime.spawner import SpawnHelper

#: Every catchable classic signal: their dispositions are reset to default in the child,
#: so a daemon that ignores one (SIGPIPE, as Python does) does not pass that on.
_DEFAULT_SIGNALS = frozenset(range(1, 32)) - {signal.SIGKILL, signal.SIGSTOP}
DEFAULT_SIGNALS = _DEFAULT_SIGNALS

#: Where a command too long to be an argument is open in its loader (see core/launch.py).
SCRIPT_FD = 3

#: Held while the process's cwd is changed for a spawn (a ``user``'s runs in a worker thread).
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
    """A started command.

    For a PTY command with ``relays`` (their pids: output, input), ``output_fd`` and
    ``input_fd`` are the relays' pipes and ``terminal_fd`` is the master, kept for
    resizes; without relays (no ``cat``) ``output_fd`` is the master and ``input_fd`` a
    dup of it. The fds belong to the caller, which must close them. ``popen`` is kept
    only so that the reaper can mark it reaped; its wait/poll are never called.
    """

    pid: int
    output_fd: int
    error_fd: int | None
    input_fd: int | None
    pty: bool
    popen: subprocess.Popen[bytes] | None = None
    #: The peak RSS of the process whose memory the child shared until its exec (the
    #: daemon's, or the spawner helper's; see process.exit_status); 0: the daemon's now.
    spawner_peak_kib: int = 0
    terminal_fd: int | None = None
    relays: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.spawner_peak_kib:
            self.spawner_peak_kib = own_peak_rss_kib()


def own_peak_rss_kib() -> int:
    """The daemon's peak RSS in KiB: ``VmHWM``, the high-water mark of its own memory.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: that one keeps, across exec, the peak of
    whatever process spawned the daemon (a test runner, say), which is not what a
    vfork-spawned command inherits from the daemon.
    """
    global _status_fd
    try:
        if _status_fd is None:  # kept open: a pread per spawn, not an open and a close
            _status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        status = os.pread(_status_fd, 8192, 0)
        start = status.index(b"VmHWM:") + 6
        return int(status[start : status.index(b"kB", start)])
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


#: ``/proc/self/status``, open for ``own_peak_rss_kib``.
_status_fd: int | None = None


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


async def start(
    spawner: Callable[[SpawnRequest], Child],
    request: SpawnRequest,
    helper: SpawnHelper | None = None,
) -> Child:
    """Start ``request``: through the spawner ``helper`` while it runs (see spawner.py),
    else ``spawner(request)`` on the event loop; in a worker thread for a ``user`` (the
    spawn changes the calling thread's credentials). Never abandoned once begun.

    On the loop, a vfork-style spawn holds the loop until the child has exec'd; that was
    measured cheaper, in CPU per command, than the worker thread's two hand-offs.
    """
    if request.user is not None:
        return await trio.to_thread.run_sync(spawner, request)
    if helper is not None and helper.running:
        return await helper.spawn(request, spawner)
    return spawner(request)


def spawn(request: SpawnRequest) -> Child:
    """Start ``request`` and return its pid and fds; raises ``SpawnFailed``.

    Blocks until the child has exec'd (or failed to); ``start`` runs it where it belongs.
    Register the pid with ``Reaper.watch(..., since=)`` as soon as it returns.
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
class Stdio:
    """The fds of a child about to start: the daemon's ends and the child's."""

    output_fd: int  # stdout, the output relay's pipe, or the PTY master
    error_fd: int | None
    input_fd: int | None
    child_in: int | None  # None: /dev/null
    child_out: int
    child_err: int
    slave_path: str | None  # the PTY slave, opened by path in the child
    parent_fds: list[int]
    child_fds: list[int]
    terminal_fd: int | None = None
    relays: tuple[int, int] | None = None

    def child(
        self, pid: int, pty: bool, popen: subprocess.Popen[bytes] | None = None, peak_kib: int = 0
    ) -> Child:
        """The started ``Child`` that owns these fds (``peak_kib``: see Child)."""
        fds = (self.output_fd, self.error_fd, self.input_fd)
        return Child(pid, *fds, pty, popen, peak_kib, self.terminal_fd, self.relays)

    def close_parent_ends(self) -> None:
        for fd in self.parent_fds:
            os.close(fd)

    def close_child_ends(self) -> None:
        for fd in self.child_fds:
            os.close(fd)


def open_stdio(request: SpawnRequest) -> Stdio:
    parent: list[int] = []
    child: list[int] = []
    try:
        if request.pty:
            master, slave = os.openpty()
            parent.append(master)
            child.append(slave)
            set_window_size(master, request.cols, request.rows)  # never start at 0x0
            slave_path = os.ttyname(slave)
            program = relay_program()
            terminal: int | None = None
            relays: tuple[int, int] | None = None
            if program is None:  # the daemon reads and writes the master itself
                reads, writes = master, os.dup(master)
                parent.append(writes)
            else:
                with _CWD_LOCK:  # (the relays start in "/", not in another spawn's work dir)
                    reads, writes, relays = _start_relays(program, master)
                parent += [reads, writes]
                terminal = master
            return Stdio(
                reads,
                None,
                writes,
                slave,
                slave,
                slave,
                slave_path,
                parent,
                child,
                terminal_fd=terminal,
                relays=relays,
            )
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pipesize.widen(out_r)
        pipesize.widen(err_r)
        parent += [out_r, err_r]
        child += [out_w, err_w]
        child_in: int | None = None
        input_fd: int | None = None
        if not request.close_stdin:
            child_in, input_fd = os.pipe()
            parent.append(input_fd)
            child.append(child_in)
        return Stdio(out_r, err_r, input_fd, child_in, out_w, err_w, None, parent, child)
    except BaseException:
        for fd in parent + child:
            os.close(fd)
        raise


# ---- PTY relays ----------------------------------------------------------------------
#
# The kernel hands out a PTY master's output 4,095 bytes a read, and the writing command
# stops once about 68 KB wait in the PTY. On the daemon's one thread each read waits behind
# the framing and sending of what came before, so the command stalls in between (measured
# with bench/pty_paths.py; docs/performance.md, "PTY"). A relay process reads the master
# without stopping and fills a pipe that the daemon empties 256 KiB at a time.
#
# The relay is the spawner helper's program run under another name (spawner.c), not
# ``cat``: the master is one open file description, O_NONBLOCK set through any fd of it is
# set on all, the daemon writes stdin to it without blocking, and ``cat`` gives up at its
# first EAGAIN; our relay waits in poll() instead. (Input relayed through a second ``cat``,
# as before, lost the command's last output now and then: 3 runs in 3,000 of ``cat; echo
# rc=$?`` typed in pieces; none with the master written directly. See docs/performance.md.)
# The daemon keeps one more fd of the master for resizes and to hold the terminal until
# its session lets go (LiveSession).
#
# The relay runs in a session of its own (no controlling terminal, outside the command's
# process group and tree: no signal for the command reaches it), with default signal
# dispositions, an empty environment and stderr on /dev/null. It exits by itself when the
# master reports EIO (every holder of the slave closed it), having written all it read;
# the session kills one left waiting on a terminal that a background child still holds.

#: The relays' argv[0]: what ``ps`` shows for them.
RELAY_NAME = "sandboxd-pty-relay"


#: The spawner helper's program (built by `make spawner`), which is also the relay.
HELPER_PROGRAM = Path(__file__).with_name("sandboxd-spawner")


@functools.cache
def relay_program() -> str | None:
    """The path to exec a relay by, or None (the helper is not built: PTYs are then
    read directly).

    The helper's program, held open (O_PATH) and run as ``/proc/self/fd/N``: the kernel
    names a process after the last part of the path it was exec'd by, so a relay's
    ``comm`` is a number, never the helper's own (spawner.collect_old_helpers goes by
    it), and a program replaced on disk later does not change what runs."""
    path = str(HELPER_PROGRAM) if os.access(HELPER_PROGRAM, os.X_OK) else None
    if path is None:
        return None
    try:
        held = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    return f"/proc/self/fd/{held}"


def kill_stray_relays() -> int:
    """SIGKILL every PTY relay that is a child of this process; how many. For a fresh
    start after a failed handover: no session owns them any more, and the terminals they
    hold open must hang up, as they did when the daemon held the only master fds. (A
    child not reaped keeps its pid, so the pid read is still that relay's.)"""
    me, killed = os.getpid(), 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or reexec.parent_of(int(name)) != me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                if cmdline.read() != RELAY_NAME.encode() + b"\0":
                    continue
            os.kill(int(name), signal.SIGKILL)
            killed += 1
        except OSError:
            continue  # gone meanwhile
    return killed


def _start_relays(program: str, master: int) -> tuple[int, int, tuple[int, int]]:
    """Start the output relay on ``master``: (the pipe end the daemon reads, the fd of
    the master it writes input to, (the relay's pid, 0: there is no input relay)). On an
    error nothing it opened stays open."""
    output_r, output_w = os.pipe()
    try:
        pipesize.widen(output_r)
        output_relay = _spawn_relay(program, master, output_w)
        writes = os.dup(master)
    except OSError as exc:
        os.close(output_r)
        raise SpawnFailed(f"cannot start the PTY relay: {exc.strerror}") from None
    finally:
        os.close(output_w)
    return output_r, writes, (output_relay, 0)


def _spawn_relay(program: str, source: int, sink: int) -> int:
    return os.posix_spawn(
        program,
        [RELAY_NAME],
        {},
        file_actions=[
            (os.POSIX_SPAWN_DUP2, source, 0),
            (os.POSIX_SPAWN_DUP2, sink, 1),
            (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        ],
        setsid=True,
        setsigmask=(),
        setsigdef=_DEFAULT_SIGNALS,
    )


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


def prepared_argv(request: SpawnRequest) -> tuple[list[str], int | None]:
    """The argv to exec and the loader's script fd (to be put at ``SCRIPT_FD``), or None:
    a command too long to be an argument runs from a memfd (see core/launch.py)."""
    argv = request.argv
    if launch.needs_loader(argv):
        return launch.loader_argv(argv[0], SCRIPT_FD), _script(argv[2])
    return argv, None


def _posix_spawn(request: SpawnRequest, env: dict[str, str], user: identity.User | None) -> Child:
    argv, script = prepared_argv(request)
    try:
        stdio = open_stdio(request)
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
        # the lock keeps spawns in different threads from crossing.
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
    return stdio.child(pid, request.pty)


def _popen_as_user(request: SpawnRequest, env: dict[str, str], user: identity.User) -> Child:
    """Where per-thread credentials are not known (see identity.py): ``Popen``, whose C
    child does setgroups/setgid/setuid. A PTY is then the command's stdio but not its
    controlling terminal, and only SIGPIPE and SIGXFSZ are reset."""
    argv, scripts = request.argv, []
    if launch.needs_loader(argv):
        scripts = [_script(argv[2])]
        argv = launch.loader_argv(argv[0], scripts[0])
    try:
        stdio = open_stdio(request)
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
    return stdio.child(popen.pid, request.pty, popen)
