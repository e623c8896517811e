"""A live upgrade, old image's side: guard, pre-flight, drain, then re-exec in place.

1. ``prepare`` (async; a refusal changes nothing): one upgrade at a time, not with
   ``--no-upgrade``. The candidate runs as an ordinary child of the one reaper with
   ``--verify-state-fd 3`` on a dry-run blob: it must import, decode this schema and
   find every pid to be its parent's child. Then nothing new starts (new connections
   queue in the listening socket's backlog, new upgrades and executes get 503) and
   in-flight HTTP requests get ``--upgrade-drain-seconds`` to finish.
2. ``commit``: every session with clients gets its grace, the clients are closed
   (1001 after ``started``, SSE with ``ack_required``, tunnels 1001), and then, in one
   synchronous stretch with no await (so no task runs and no byte is read in between):
   the final snapshot, a sealed memfd, the swap signals blocked, CLOEXEC cleared on the
   listening socket, every carried fd and the memfd, and ``execve`` of the candidate
   with ``--resume-fd``. If ``execve`` fails, everything is undone and serving resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from sandboxd import __version__
from sandboxd.core.config import Config
from sandboxd.core.errors import SandboxdError
from sandboxd.core.handover import HandoverState, UpgradeRecord, seal
from sandboxd.runtime import carried, reexec, spawn, verified
from sandboxd.runtime.notify import Notifier
from sandboxd.runtime.supervisor import Supervisor

log = logging.getLogger("sandboxd.upgrade")

#: How long the candidate may take to verify the dry-run blob.
PREFLIGHT_SECONDS = 20.0
#: How long closing the clients may take before the swap goes on anyway.
CLOSE_SECONDS = 2.0
#: Stderr of a failed candidate kept for the refusal's reason.
STDERR_TAIL = 2000


class UpgradeRefused(SandboxdError):
    """An upgrade was refused; nothing was changed."""

    error_type = "UpgradeRefused"
    http_status = 409


class Frontend(Protocol):
    """What the upgrade needs of the HTTP side (``App`` and the listener)."""

    def pause_accepting(self) -> None: ...
    def resume_accepting(self) -> None: ...
    async def wait_drained(self, seconds: float) -> bool: ...
    async def close_for_upgrade(self, within: float) -> None: ...
    async def reopen(self) -> None: ...


@dataclass
class UpgradeContext:
    """What the daemon was started with that an upgrade needs (None in-process: no
    upgrades, the test runner is not the daemon)."""

    daemon_args: list[str]
    generation: int = 0
    last: UpgradeRecord | None = None
    #: The identity of the installed candidate that passed its pre-flight check and is
    #: this image (``verified.identity``): upgrading to it again skips the check.
    verified: str | None = None


@dataclass
class UpgradeStatus:
    """What ``/healthz`` shows of upgrades."""

    generation: int = 0
    last: UpgradeRecord | None = None
    in_progress: bool = False

    def fields(self) -> dict[str, object]:
        last = self.last
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "last_upgrade": None
            if last is None
            else {
                "result": last.result,
                "reason": last.reason,
                "at": last.at,
                "swap_ms": last.swap_ms,
                "from_version": last.from_version,
                "to_version": last.to_version,
            },
        }


def record(status: UpgradeStatus, result: str, reason: str | None, **more: object) -> None:
    """Set ``last_upgrade`` and log the one line of this upgrade."""
    status.last = UpgradeRecord(
        result=result,
        at=time.time(),
        from_version=str(more.get("from_version", __version__)),
        reason=reason,
        swap_ms=more.get("swap_ms"),  # type: ignore[arg-type]
        to_version=more.get("to_version"),  # type: ignore[arg-type]
    )
    log_upgrade(status)


def step_ms(since: str, since_ns: int, marks: Mapping[str, int]) -> dict[str, float]:
    """``{since}_to_{name}_ms`` for each mark (monotonic ns), counted from ``since_ns``:
    the fields of the upgrade's timing log lines."""
    return {f"{since}_to_{name}_ms": round((ns - since_ns) / 1e6, 3) for name, ns in marks.items()}


def log_upgrade(status: UpgradeStatus) -> None:
    """The one log line of an upgrade: ``last_upgrade``'s fields and the generation."""
    fields = status.fields()
    last = fields["last_upgrade"]
    assert isinstance(last, dict)
    level = logging.INFO if last["result"] == "ok" else logging.WARNING
    log.log(level, "upgrade", extra={"generation": status.generation, "pid": os.getpid(), **last})


class Upgrader:
    """Runs live upgrades of this daemon (one at a time)."""

    def __init__(
        self,
        config: Config,
        supervisor: Supervisor,
        frontend: Frontend,
        listen_fd: int,
        status: UpgradeStatus,
        context: UpgradeContext | None,
        notifier: Notifier | None = None,
    ) -> None:
        self._config = config
        self._supervisor = supervisor
        self._frontend = frontend
        self._listen_fd = listen_fd
        self.status = status
        self._context = context
        self._notifier = notifier
        self._faults = reexec.faults(os.environ)
        self._trigger_ns = 0
        self._marks: dict[str, int] = {}  # monotonic ns of each step (the exec log line)
        self._identity: str | None = None  # of the candidate that passed (or was cached)
        self._preflight_run = False

    @property
    def daemon_args(self) -> list[str]:
        """The daemon's own arguments (what a candidate is started with)."""
        return list(self._context.daemon_args) if self._context else []

    # ---- the steps ------------------------------------------------------------------

    def check_can_start(self) -> None:
        """Raise ``UpgradeRefused`` if an upgrade cannot start now."""
        if not self._config.upgrade:
            raise UpgradeRefused("live upgrades are disabled (--no-upgrade)")
        if self._context is None:
            raise UpgradeRefused("this daemon runs inside another program: no live upgrade")
        if self.status.in_progress:
            raise UpgradeRefused("another upgrade is under way")
        if self._supervisor.shutting_down:
            raise UpgradeRefused("sandboxd is shutting down")

    async def prepare(self, candidate: Sequence[str] | None = None) -> list[str]:
        """Check and drain; the candidate's argv (without ``--resume-fd``). Raises
        ``UpgradeRefused`` (then nothing changed)."""
        self.check_can_start()
        assert self._context is not None
        self.status.in_progress = True
        self._trigger_ns = time.monotonic_ns()
        self._marks = {}
        args = self._context.daemon_args
        argv = list(candidate) if candidate else reexec.installed_program(args, os.environ)
        # Only what is installed is looked up in the cache: an upload is always checked.
        identity = verified.identity(argv) if not candidate else None
        self._identity, self._preflight_run = None, False
        try:
            if identity is not None and identity == self._context.verified:
                self._identity = identity  # unchanged since it passed: not checked again
            elif "skip-preflight" not in self._faults:
                await self._preflight(argv)
                self._preflight_run = True
                if identity is not None and verified.identity(argv) == identity:
                    self._identity = identity  # (what passed is what is installed now)
            self._marks["preflight"] = time.monotonic_ns()
            self._supervisor.upgrading = True
            self._notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            self._frontend.pause_accepting()
            log.info("upgrade draining")  # (the exec line says whether the pre-flight ran)
            drained = await self._frontend.wait_drained(self._config.upgrade_drain_seconds)
            self._marks["drained"] = time.monotonic_ns()
            if not drained:
                raise UpgradeRefused(
                    "in-flight HTTP requests did not finish within "
                    f"{self._config.upgrade_drain_seconds} s (--upgrade-drain-seconds)"
                )
            if self._supervisor.shutting_down:  # a stop began meanwhile: a stop stays a stop
                raise UpgradeRefused("sandboxd is shutting down")
        except UpgradeRefused as exc:
            self._undo()
            record(self.status, "refused", exc.message)
            raise
        except Exception as exc:  # (EMFILE, ENOMEM...): a refusal, never a dead daemon
            self._undo()
            log.exception("upgrade failed before the swap")
            record(self.status, "refused", f"{type(exc).__name__}: {exc}")
            raise UpgradeRefused(f"the upgrade failed: {type(exc).__name__}: {exc}") from None
        except BaseException:
            self._undo()
            raise
        return argv

    async def commit(self, argv: Sequence[str]) -> None:
        """Close the clients and re-exec (this returns only if the exec failed)."""
        try:
            now = trio.current_time()
            for live in self._supervisor.sessions.values():
                live.core.begin_grace(now, self._config.upgrade_grace)
            self._supervisor.hold_unread()
            self._marks["commit"] = time.monotonic_ns()
            await self._frontend.close_for_upgrade(CLOSE_SECONDS)
            self._marks["closed"] = time.monotonic_ns()
            # No worker thread may be mid-spawn at the exec (the child would be lost);
            # new spawns are refused, so this ends.
            await self._supervisor.wait_no_spawns()
            if self._supervisor.shutting_down:  # a stop began meanwhile: it goes on
                reason = "sandboxd is shutting down"
            else:
                reason = self._exec(argv)  # no await from the snapshot to the exec
        except Exception as exc:  # (EMFILE, ENOMEM...): a refusal, never a dead daemon
            log.exception("upgrade failed at the swap")
            reason = f"{type(exc).__name__}: {exc}"
        except BaseException:
            self._undo()
            raise
        self._undo()
        await self._frontend.reopen()
        record(self.status, "refused", reason)

    async def run(self, candidate: Sequence[str] | None = None) -> None:
        """Both steps (the SIGUSR2 trigger); a refusal (any failure) is logged and
        recorded, never raised."""
        try:
            argv = await self.prepare(candidate)
        except UpgradeRefused:
            return
        await self.commit(argv)

    # ---- pre-flight -----------------------------------------------------------------

    def _state(self, now: float) -> tuple[HandoverState, list[int]]:
        records = carried.capture(self._supervisor, now)
        supervisor = self._supervisor
        state = HandoverState(
            version=__version__,
            generation=self.status.generation,
            snapshot_monotonic_ns=time.monotonic_ns(),
            trigger_monotonic_ns=self._trigger_ns,
            listen_fd=self._listen_fd,
            rollback_argv=reexec.own_program(self._context.daemon_args if self._context else []),
            sessions=records,
            expired_keys=supervisor.expired_keys(),
            commands_started=supervisor.commands_started,
            orphans_reaped=supervisor.reaper.orphans_reaped,
            last_upgrade=self.status.last,
        )
        return state, carried.carried_fds(records)

    def _blob(self, state: HandoverState) -> bytes:
        binding = reexec.binding_of(os.getpid())
        if "other-pid" in self._faults:
            binding = type(binding)(pid=binding.pid + 1, boot_id=binding.boot_id, start_ticks=0)
        return seal(state, binding)

    async def _preflight(self, argv: list[str]) -> None:
        state, _ = self._state(trio.current_time())
        blob = reexec.damage(self._blob(state), self._faults)
        memfd = reexec.write_sealed(blob, "sandboxd-dry-run")
        try:
            code, stderr = await self._run_candidate(argv, memfd)
        finally:
            os.close(memfd)
        if code != 0:
            tail = stderr[-STDERR_TAIL:].decode(errors="replace").strip()
            raise UpgradeRefused(f"the candidate failed its pre-flight check (exit {code}): {tail}")

    async def _run_candidate(self, argv: list[str], memfd: int) -> tuple[int, bytes]:
        reaper = self._supervisor.reaper
        err_r, err_w = os.pipe()
        since = reaper.sequence
        try:
            pid = await trio.to_thread.run_sync(_spawn_verifier, argv, memfd, err_w)
        except OSError as exc:
            os.close(err_r)
            raise UpgradeRefused(f"cannot run the candidate {argv[0]!r}: {exc.strerror}") from None
        finally:
            os.close(err_w)
        done = trio.Event()
        codes: list[int] = []

        def reaped(status: object) -> None:
            codes.append(getattr(status, "code", -1))
            done.set()

        reaper.watch(spawn.Child(pid, -1, None, None, False), reaped, since=since)
        chunks: list[bytes] = []
        with trio.move_on_after(PREFLIGHT_SECONDS) as timer:
            async with trio.lowlevel.FdStream(err_r) as stream:
                while data := await stream.receive_some(65536):
                    if sum(map(len, chunks)) < 1 << 20:
                        chunks.append(data)
            await done.wait()
        if timer.cancelled_caught:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with trio.move_on_after(5.0):  # (one that cannot die: refused all the same)
                await done.wait()
            codes.append(-1)
            chunks.append(b"(timed out)")
        return codes[0], b"".join(chunks)

    # ---- the exec -------------------------------------------------------------------

    def _exec(self, argv: Sequence[str]) -> str:
        """The synchronous stretch; returns only when ``execve`` failed (why)."""
        state, fds = self._state(trio.current_time())
        blob = self._blob(state)
        memfd = reexec.write_sealed(blob)
        carried_fds = [self._listen_fd, *fds, memfd]
        environ = dict(os.environ)
        environ[reexec.ROLLBACK_VARIABLE] = reexec.encode_argv(state.rollback_argv)
        environ[reexec.ROLLBACK_ENV_VARIABLE] = reexec.encode_environ(os.environ)
        environ[reexec.LISTEN_FD_VARIABLE] = str(self._listen_fd)
        environ.pop(reexec.REASON_VARIABLE, None)
        environ.pop(verified.VARIABLE, None)
        if self._identity is not None:
            environ[verified.VARIABLE] = self._identity
        full = [*argv, "--resume-fd", str(memfd)]
        # A process-directed signal goes to any thread that does not block it: trio's
        # idle worker threads do not, and Python would then run its handler on this
        # thread after the exec is gone. So the swap signals are noted here and raised
        # again at this (blocking) thread, where they stay pending across the exec.
        noted: list[int] = []
        previous = {
            signo: signal.signal(signo, lambda signo, _: noted.append(signo))
            for signo in reexec.SWAP_SIGNALS
        }
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, reexec.SWAP_SIGNALS)
        try:
            for fd in carried_fds:
                os.set_inheritable(fd, True)
            snapshot = state.snapshot_monotonic_ns
            steps = step_ms("trigger", self._trigger_ns, {**self._marks, "snapshot": snapshot})
            steps |= step_ms("snapshot", snapshot, {"exec": time.monotonic_ns()})
            log.info(
                "upgrade exec",
                extra={
                    "argv": full[:1],
                    "sessions": len(state.sessions),
                    "blob_bytes": len(blob),
                    "preflight": "run" if self._preflight_run else "skipped",
                    **steps,
                },
            )
            _flush_logs()
            sleep = self._faults.get("exec-window-sleep")
            if sleep:
                time.sleep(float(sleep))
            for signo in noted:
                signal.pthread_kill(threading.get_ident(), signo)
            os.execve(full[0], full, environ)
        except OSError as exc:
            reason = f"cannot exec {full[0]!r}: {exc.strerror}"
        finally:
            # Only reached when the exec failed: put everything back.
            for fd in carried_fds[:-1]:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            os.close(memfd)
            for signo, handler in previous.items():
                signal.signal(signo, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # (pending ones land now)
            for signo in noted:
                os.kill(os.getpid(), signo)
        return reason

    def _undo(self) -> None:
        self.status.in_progress = False
        self._supervisor.release_held()
        if self._supervisor.upgrading:
            self._supervisor.upgrading = False
            self._frontend.resume_accepting()
            self._notify("READY=1", "STATUS=upgrade refused; serving")

    def _notify(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.send(*lines)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _spawn_verifier(argv: list[str], memfd: int, err_w: int) -> int:
    """Start the candidate on the dry-run blob at fd 3 (in a worker thread, as every
    spawn); its stderr goes to ``err_w``."""
    fd = memfd
    if fd == 3:  # a dup2 onto itself would leave it close-on-exec
        fd = os.dup(memfd)
    try:
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
            (os.POSIX_SPAWN_DUP2, fd, 3),
        ]
        return os.posix_spawn(
            argv[0],
            [*argv, "--verify-state-fd", "3"],
            dict(os.environ),
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=spawn.DEFAULT_SIGNALS,
        )
    finally:
        if fd != memfd:
            os.close(fd)
