"""The size of the pipes a command writes its stdout and stderr to.

The kernel's default pipe holds 64 KiB: a command that writes fast blocks whenever the
daemon is busy sending, and one read takes at most 64 KiB. A pipe of ``PIPE_BYTES`` lets
the command run that far ahead, and one read take a whole frame (``FRAME_BYTES``).

Only a privileged daemon widens pipes: the kernel counts pipe pages per user, and past
``/proc/sys/fs/pipe-user-pages-soft`` gives an unprivileged user's new pipes two pages,
so wide pipes would make every later pipe of the daemon narrow.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools

from sandboxd.core.config import FRAME_BYTES

PIPE_BYTES = FRAME_BYTES
_CAP_SYS_ADMIN = 21
_CAP_SYS_RESOURCE = 24
#: /proc/self/uid_map of the initial user namespace (the kernel checks capabilities there).
_INITIAL_UID_MAP = ["0", "0", "4294967295"]


@functools.cache
def privileged() -> bool:
    """Whether the kernel exempts this process from the per-user pipe quota
    (CAP_SYS_RESOURCE or CAP_SYS_ADMIN, in the initial user namespace)."""
    try:
        with open("/proc/self/status") as status:
            effective = next(line for line in status if line.startswith("CapEff:"))
        with open("/proc/self/uid_map") as uid_map:
            initial = uid_map.read().split() == _INITIAL_UID_MAP
    except (OSError, StopIteration):
        return False
    caps = int(effective.split()[1], 16)
    return initial and bool(caps & (1 << _CAP_SYS_RESOURCE | 1 << _CAP_SYS_ADMIN))


def widen(fd: int) -> None:
    """Make the pipe ``fd`` belongs to hold ``PIPE_BYTES``, when ``privileged``; a pipe
    the kernel will not widen keeps its size."""
    if privileged():
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
