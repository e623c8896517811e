"""The single reaper, exit statuses, signals, and killing whole process trees.

The rules (design.md, "Processes"):

* sandboxd is the only caller of ``wait*()`` in its process: the ``Reaper`` loops
  ``wait4(-1, WNOHANG)`` on SIGCHLD and on a 1 s safety timer and hands each status to
  whoever registered the pid. ``trio.Process``, ``subprocess.run`` or ``Popen.wait`` would
  reap behind its back and steal exit codes.
* Starting children is ``spawn.py``'s job; a ``Child`` it returns is registered here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from sandboxd.core.errors import InvalidRequest
from sandboxd.core.session import ExitStatus
from sandboxd.runtime.spawn import Child

if TYPE_CHECKING:  # (imported where used: it is not on the path to serving)
    import psutil

#: Every command's environment names its session: how escapees are found (see kill_tree).
COMMAND_ID_VARIABLE = "SANDBOXD_COMMAND_ID"

_PR_SET_CHILD_SUBREAPER = 36


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

    A child can exit, and be reaped, before its pid is registered (one spawned in a
    worker thread, or reaped by a SIGCHLD handled in between). The status
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
    import psutil

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
    import psutil

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
