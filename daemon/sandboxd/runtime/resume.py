"""A live upgrade, new image's side: adopt the state named by ``--resume-fd``, or refuse
it and go back to the old image (rollback), or, when even that is impossible, start
fresh and never exit (as PID 1 an exit would kill every command).

Everything here runs before ``trio.run``, with the swap signals still blocked (they
are unblocked once the new image's handlers are installed, see ``server_cli``).
``verify`` is the pre-flight check the old image runs on a candidate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from sandboxd import __version__
from sandboxd.core.carry import restore_core, restore_ring
from sandboxd.core.handover import HandoverRefused, HandoverState, UpgradeRecord, unseal
from sandboxd.core.ringbuffer import BufferPool
from sandboxd.runtime import carried, reexec, spawn

log = logging.getLogger("sandboxd.upgrade")


@dataclass
class Resumed:
    """What the new image adopts: the state, its listening socket, and how the swap
    went (``rolled_back``: this is the old image back again)."""

    state: HandoverState | None
    sock: socket.socket | None
    generation: int
    last: UpgradeRecord | None
    #: monotonic ns of the new image's start-up steps (for the ``upgrade timing`` line).
    marks: dict[str, int] = field(default_factory=dict)


def verify(fd: int) -> int:
    """``--verify-state-fd``: decode the dry-run blob our parent (the daemon) wrote and
    check it; 0, or 1 with the reason on stderr."""
    try:
        import sandboxd.service  # noqa: F401  (the whole daemon must import)

        blob = reexec.read_all(fd)
        parent = os.getppid()
        state = unseal(blob, reexec.binding_of(parent))
        carried.check_pids(
            state.sessions, parent, gone_ok=True
        )  # (its fds are the daemon's, not here)
        # Every session as the new image will rebuild it (a state or reason this code
        # does not know fails here, before the daemon gives up control).
        pool = BufferPool(1 << 62)
        for record in state.sessions:
            restore_core(
                record.core,
                0.0,
                restore_ring(record.stdout.ring, pool.ring(record.stdout.ring.capacity)),
                restore_ring(record.stderr.ring, pool.ring(record.stderr.ring.capacity)),
            )
    except (HandoverRefused, ValueError, OSError, ImportError) as exc:
        reason = exc.reason if isinstance(exc, HandoverRefused) else str(exc)
        print(f"sandboxd {__version__} refuses the state: {reason}", file=sys.stderr)
        return 1
    return 0


def _listen_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise ValueError(f"fd {fd} is not a listening stream socket")
    return sock


def resume(fd: int, rollback_of: str | None) -> Resumed:
    """Adopt the blob at ``fd``, or roll back (exec the old image: does not return), or
    start fresh. ``rollback_of``: this image is the rollback from that version."""
    wanted = reexec.faults(os.environ)
    from_version = "?"
    try:
        blob = reexec.read_all(fd)
        binding = reexec.binding_of(os.getpid())
        if rollback_of is None:
            # (the faults damage what the candidate reads; the rollback reads it intact)
            blob = reexec.damage(blob, wanted)
            if "other-pid" in wanted:
                binding = type(binding)(pid=binding.pid + 1, boot_id="", start_ticks=0)
        state = unseal(blob, binding)
        from_version = state.version
        if rollback_of is None and "fail-resume" in wanted:
            raise ValueError("fault hook fail-resume")
        carried.check_fds(state.sessions)
        if rollback_of is None:  # (the rollback is lenient: it takes what is there)
            carried.check_pids(state.sessions, os.getpid())
        sock = _listen_socket(state.listen_fd)
    except (HandoverRefused, ValueError, OSError) as exc:
        reason = exc.reason if isinstance(exc, HandoverRefused) else str(exc)
        if rollback_of is None:
            _roll_back(fd, reason)  # returns only when the old image cannot be exec'd
            reason = f"rollback impossible after: {reason}"
        return _fresh(fd, from_version, reason)
    os.close(fd)
    if rollback_of is not None:
        reason = os.environ.get(reexec.REASON_VARIABLE) or "the new image refused the state"
        last = UpgradeRecord(
            result="rolled_back",
            at=time.time(),
            from_version=state.version,
            reason=reason,
            to_version=rollback_of,
        )
        generation = state.generation
    else:
        last = UpgradeRecord(
            result="ok",
            at=time.time(),
            from_version=state.version,
            to_version=__version__,
        )
        generation = state.generation + 1
    for name in reexec.HANDOVER_VARIABLES:
        os.environ.pop(name, None)
    return Resumed(state, sock, generation, last)


def _roll_back(fd: int, reason: str) -> None:
    """Exec the old image's argv with the same blob; returns only if that failed."""
    argv = reexec.decode_argv(os.environ.get(reexec.ROLLBACK_VARIABLE, ""))
    if argv is None:
        return
    args, _ = reexec.strip_internal(argv)
    full = [*args, "--resume-fd", str(fd), "--rollback-of", __version__]
    # The old image's own environment: not what a candidate (a wrapper) changed.
    old = reexec.decode_environ(os.environ.get(reexec.ROLLBACK_ENV_VARIABLE, ""))
    environ = dict(os.environ) if old is None else old
    listen = os.environ.get(reexec.LISTEN_FD_VARIABLE)
    if listen is not None:
        environ[reexec.LISTEN_FD_VARIABLE] = listen
    environ[reexec.REASON_VARIABLE] = reason[:1000]
    log.warning("upgrade refused by the new image; rolling back", extra={"reason": reason})
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        os.execve(full[0], full, environ)
    except OSError as exc:
        log.error("rollback exec failed", extra={"error": str(exc)})


def _fresh(fd: int, from_version: str, reason: str) -> Resumed:
    """Neither image can adopt the state: keep the listening socket if it can be found,
    close every other inherited fd and kill the PTY relays (the commands then see their
    ends close) and start with no sessions."""
    log.error("handover failed; starting fresh", extra={"reason": reason})
    sock = None
    listen = os.environ.pop(reexec.LISTEN_FD_VARIABLE, "")
    if listen.isdigit():
        try:
            sock = _listen_socket(int(listen))
        except (OSError, ValueError):
            sock = None
    keep = {sock.fileno()} if sock is not None else set()
    for name in os.listdir("/proc/self/fd"):
        number = int(name)
        if number > 2 and number not in keep:
            try:
                if os.get_inheritable(number):
                    os.close(number)
            except OSError:
                pass
    if fd not in keep:
        with contextlib.suppress(OSError):
            os.close(fd)
    spawn.kill_stray_relays()  # their PTY commands' terminals then hang up
    for name in (reexec.ROLLBACK_VARIABLE, reexec.ROLLBACK_ENV_VARIABLE, reexec.REASON_VARIABLE):
        os.environ.pop(name, None)
    last = UpgradeRecord(
        result="refused",
        at=time.time(),
        from_version=from_version,
        reason=f"handover failed, started fresh: {reason}",
    )
    return Resumed(None, sock, 0, last)
