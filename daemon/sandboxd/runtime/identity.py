"""Who a command runs as: ``run_config.user`` resolved, and taken on for one spawn.

A command for another user is started by the same ``posix_spawn`` as any other (setsid,
every signal reset, the PTY opened as controlling terminal by the file actions), from a
worker thread that holds that user's credentials for the length of the call. Linux keeps
credentials per thread: the raw ``setgroups``/``setresgid``/``setresuid`` system calls
change only the calling thread (glibc's wrappers would change every thread of the daemon),
and the child ``posix_spawn`` creates copies them. ``execve`` then sets the saved ids to
the new ones and drops every capability, so the command keeps nothing of root; the
thread takes its own credentials back at once (its saved uid stayed 0 for that).
No Python runs in the child, and nothing forks.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import platform
import pwd
from collections.abc import Iterator
from dataclasses import dataclass

from sandboxd.core.errors import InvalidRequest, SpawnFailed

#: (setgroups, setresgid, setresuid) system call numbers; elsewhere ``THREAD_CREDENTIALS``
#: is False and a command for another user falls back to ``subprocess.Popen``.
_SYSCALLS = {
    "x86_64": (116, 119, 117),
    "aarch64": (159, 149, 147),  # the generic table, as riscv64
    "riscv64": (159, 149, 147),
}
_NUMBERS = _SYSCALLS.get(platform.machine())
THREAD_CREDENTIALS = _NUMBERS is not None


@dataclass(frozen=True, slots=True)
class User:
    """``run_config.user`` resolved: ids, supplementary groups, and its password entry."""

    uid: int
    gid: int
    groups: list[int]
    name: str | None
    home: str | None

    def is_current(self) -> bool:
        """Whether the daemon already runs with exactly these credentials."""
        return (self.uid, self.gid) == (os.geteuid(), os.getegid()) and set(self.groups) == (
            set(os.getgroups()) | {self.gid}
        )


def resolve_user(spec: str) -> User:
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
        return User(uid, gid, [gid], None, None)
    return User(uid, gid, os.getgrouplist(entry.pw_name, gid), entry.pw_name, entry.pw_dir)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _call(number: int, *args: object) -> None:
    if _LIBC.syscall(ctypes.c_long(number), *args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _set_thread_ids(
    uid: tuple[int, int, int], gid: tuple[int, int, int], groups: list[int]
) -> None:
    """setgroups, setresgid, setresuid for this thread only, in the order root needs."""
    assert _NUMBERS is not None
    setgroups, setresgid, setresuid = _NUMBERS
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _call(setgroups, ctypes.c_size_t(len(groups)), array)
    _call(setresgid, *(ctypes.c_uint(i) for i in gid))
    _call(setresuid, *(ctypes.c_uint(i) for i in uid))


@contextlib.contextmanager
def thread_identity(user: User) -> Iterator[None]:
    """Hold ``user``'s credentials in this thread only; raises ``SpawnFailed`` if refused."""
    assert _NUMBERS is not None
    uids, gids, groups = os.getresuid(), os.getresgid(), os.getgroups()
    try:
        # The saved uid stays ours, so that the thread can take its own ids back.
        _set_thread_ids((user.uid, user.uid, uids[1]), (user.gid,) * 3, user.groups)
    except OSError as exc:
        _restore(uids, gids, groups)
        raise SpawnFailed(f"cannot start as {user.uid}: {exc.strerror}") from None
    try:
        yield
    finally:
        _restore(uids, gids, groups)


def _restore(uids: tuple[int, int, int], gids: tuple[int, int, int], groups: list[int]) -> None:
    assert _NUMBERS is not None
    _, _, setresuid = _NUMBERS
    with contextlib.suppress(OSError):  # checked below
        _call(setresuid, *(ctypes.c_uint(i) for i in uids))  # first: root again
        _set_thread_ids(uids, gids, groups)
    if (os.getresuid(), os.getresgid(), sorted(os.getgroups())) != (uids, gids, sorted(groups)):
        # A worker thread left with a command's identity would do later work as that
        # user: the kernel allows the way back, so this cannot happen; if it does, stop.
        os.abort()
