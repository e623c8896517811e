"""Tools of the live-upgrade tests (issue 11, /work/wt/UPGRADE_CONTRACT.md): trigger an
upgrade and wait for its outcome, audit the daemon (fds, zombies, RSS), a connect loop, and
deterministic streams whose sha256 is known."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.sdk.conftest import PYTHON_PROGRAM, DaemonProcess, start_daemon, stop_daemon

#: O_CLOEXEC as the ``flags:`` line of /proc/<pid>/fdinfo/<fd> shows it (octal).
O_CLOEXEC = 0o2000000
SIGCHLD_BIT = 1 << (signal.SIGCHLD - 1)

Trigger = Literal["signal", "http"]


# ---- the daemon ----------------------------------------------------------------------------


@contextmanager
def upgrade_daemon(
    *args: str,
    fault: str = "",
    launcher: Sequence[str] = (),
    program: Sequence[str] = PYTHON_PROGRAM,
    allow_errors: bool = False,
    expect_exit: int | None = 0,
) -> Iterator[DaemonProcess]:
    """A daemon process (``--home /tmp --stop-grace 1`` + ``args``), with the test-only
    fault hooks ``fault`` in its environment; stopped by SIGTERM afterwards, which must end
    it with ``expect_exit`` (None: the test stopped it itself) and, unless
    ``allow_errors``, no error logged."""
    env = ["env", f"SANDBOXD_TEST_UPGRADE_FAULT={fault}"] if fault else []
    daemon = start_daemon(
        "--home", "/tmp", "--stop-grace", "1", *args, launcher=[*launcher, *env], program=program
    )
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            code = stop_daemon(daemon)
        else:
            code = daemon.process.returncode
            if daemon.reader is not None:
                daemon.reader.join(timeout=10)
            if daemon.process.stderr is not None:
                daemon.process.stderr.close()
        if expect_exit is not None:
            quiet = [e for e in daemon.logs if "command" not in str(e.get("msg"))]
            assert code == expect_exit, (code, quiet[-12:])
        if not allow_errors:
            errors = [e for e in daemon.logs if e.get("level") in ("error", "critical")]
            assert errors == [], errors[:3]


def healthz(address: str, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /healthz`` (it answers 503 while stopping: its body is returned all the same)."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=timeout) as response:
            body: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as error:
        body = json.load(error)
    return body


def sessions(address: str) -> list[dict[str, Any]]:
    """``GET /sessions``."""
    with urllib.request.urlopen(f"http://{address}/sessions", timeout=10) as response:
        rows: list[dict[str, Any]] = json.load(response)["sessions"]
    return rows


def session(address: str, command_id: str) -> dict[str, Any] | None:
    """The ``/sessions`` row of ``command_id``; None once it is gone."""
    return next((s for s in sessions(address) if s["command_id"] == command_id), None)


def post_upgrade(
    address: str, body: bytes = b"", token: str | None = None
) -> tuple[int, dict[str, Any]]:
    """``POST /admin/upgrade`` (``body``: an artifact); its status and JSON body."""
    headers = {"content-type": "application/octet-stream"}
    if token:
        headers["x-api-key"] = token
    request = urllib.request.Request(
        f"http://{address}/admin/upgrade", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw.startswith(b"{") else {"raw": raw.decode()}


def trigger(daemon: DaemonProcess, how: Trigger, pid: int | None = None) -> int | None:
    """Start one upgrade by SIGUSR2 (to ``pid``, default the daemon's) or by HTTP; the HTTP
    status (which must be 202), None for the signal."""
    if how == "signal":
        os.kill(pid or daemon.process.pid, signal.SIGUSR2)
        return None
    status, body = post_upgrade(daemon.address)
    assert status == 202, (status, body)
    return status


#: Requests of ``wait_generation`` that an image accepted and closed without an answer.
DROPPED_REQUESTS: list[str] = []


def wait_generation(
    address: str, generation: int, timeout: float = 60.0, since: float = 0.0
) -> dict[str, Any]:
    """Poll ``/healthz`` until it shows ``generation``; the health it then showed. Fails
    at once when an upgrade recorded at or after ``since`` (unix seconds) ended refused or
    rolled back, or the generation overshoots."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            health = healthz(address)
        except (OSError, http.client.HTTPException) as error:
            # a request the old image accepted and then dropped at its exec
            DROPPED_REQUESTS.append(repr(error))
            assert time.monotonic() < deadline, f"generation {generation} not reached: {error!r}"
            time.sleep(0.02)
            continue
        last = health.get("last_upgrade") or {}
        assert last.get("result") in (None, "ok") or last["at"] < since - 0.5, health
        assert health["generation"] <= generation, health
        if health["generation"] == generation:
            return health
        assert time.monotonic() < deadline, f"generation {generation} not reached: {health}"
        time.sleep(0.02)


def wait_last_upgrade(address: str, since: float, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``/healthz`` until ``last_upgrade`` is one recorded at or after ``since`` (unix
    seconds); that health."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            health = healthz(address)
        except OSError:
            health = {}
        last = health.get("last_upgrade")
        if last and last["at"] >= since - 0.5:
            return health
        assert time.monotonic() < deadline, f"no upgrade outcome recorded: {health}"
        time.sleep(0.05)


# ---- auditing the daemon -------------------------------------------------------------------


def fds(pid: int) -> dict[int, str]:
    """The open fds of ``pid`` and what they point at."""
    found: dict[int, str] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed while listed
    return found


def fds_without_cloexec(pid: int) -> dict[int, str]:
    """The fds >= 3 of ``pid`` that a spawned program would inherit."""
    leaking: dict[int, str] = {}
    for fd, target in fds(pid).items():
        if fd < 3:
            continue
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue
        flags = int(
            next(line for line in info.splitlines() if line.startswith("flags:")).split()[1], 8
        )
        if not flags & O_CLOEXEC:
            leaking[fd] = target
    return leaking


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid`` from /proc/<pid>/stat; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def zombie_children(pid: int) -> list[int]:
    """Children of ``pid`` that exited and were not reaped."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) and stat == ("Z", pid):
            found.append(int(name))
    return found


def wait_no_zombies(pid: int, within: float = 5.0) -> list[int]:
    """Zombie children of ``pid`` still there after ``within`` seconds of polling."""
    deadline = time.monotonic() + within
    while (found := zombie_children(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def rss(pid: int) -> int:
    """Resident set size of ``pid``, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def ignores_sigchld(pid: int) -> bool:
    """Whether ``pid`` has SIGCHLD set to SIG_IGN (children would then be auto-reaped and
    their statuses lost)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & SIGCHLD_BIT)
    raise AssertionError("no SigIgn")


@dataclass
class ConnectProbe:
    """A thread that opens (and at once closes) a TCP connection to ``address`` every
    ``interval`` seconds; a listening socket closed and bound again, even briefly, shows
    up as a refused connection."""

    address: str
    interval: float = 0.005
    attempts: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ConnectProbe:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        host, port = self.address.rsplit(":", 1)
        while not self._stop.wait(self.interval):
            self.attempts += 1
            try:
                with socket.create_connection((host, int(port)), timeout=10):
                    pass
            except ConnectionRefusedError:
                self.refused += 1
            except OSError as error:
                self.errors.append(repr(error))


# ---- deterministic streams -----------------------------------------------------------------

#: Filler with multi-byte characters, so a byte lost inside one would break UTF-8 too.
FILLER = "héllo wörld ünïcode " * 4


@dataclass
class StreamDigest:
    """sha256 and length of a stream as it arrives, with its last bytes (enough to read
    a loop command's closing ``end N`` line)."""

    sha: Any = field(default_factory=hashlib.sha256)
    length: int = 0
    tail: bytes = b""

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.length += len(data)
        self.tail = (self.tail + data)[-200:]

    @property
    def hexdigest(self) -> str:
        return str(self.sha.hexdigest())


def digest(data: bytes) -> tuple[int, str]:
    """(length, sha256) of ``data``."""
    return len(data), hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Command:
    """One command of a test: how it is run and what it must produce.

    ``kind`` says how its expected output is known: ``fixed`` (``stdout``/``stderr`` as
    given), ``loop`` (lines numbered 0..N-1 and a closing ``end N`` line: N is read from
    the stream, and the lines before it are then fixed) or ``seq`` (``seq -w 1 N``).
    """

    key: str
    command: str
    exit_code: int
    pty: bool = False
    kind: Literal["fixed", "loop", "seq"] = "fixed"
    stdout: bytes = b""
    stderr: bytes = b""
    seq_n: int = 0

    def expected(self, stream: str, tail: bytes) -> bytes:
        """The whole expected ``stream``; ``tail`` is the end of what arrived (``loop``)."""
        if self.kind == "fixed":
            return self.stdout if stream == "stdout" else self.stderr
        if self.kind == "seq":
            if stream == "stderr":
                return b""
            width = len(str(self.seq_n))
            return "".join(f"{i:0{width}d}\n" for i in range(1, self.seq_n + 1)).encode()
        if stream == "stderr" and self.pty:
            return b""
        n = loop_count(self.key, stream, tail)
        return loop_text(self.key, stream, n, self.pty)


def loop_line(key: str, stream: str, i: int) -> str:
    return f"{key} {stream} {i:08d} {FILLER}\n" if stream == "stdout" else f"{key} e {i:08d}\n"


def loop_text(key: str, stream: str, n: int, pty: bool) -> bytes:
    """What a loop command with ``n`` iterations writes to ``stream``."""
    text = "".join(loop_line(key, stream, i) for i in range(n)) + f"{key} end {n}\n"
    if pty:
        text = text.replace("\n", "\r\n")  # the terminal's onlcr
    return text.encode()


def loop_count(key: str, stream: str, tail: bytes) -> int:
    """N from the ``end N`` line a loop command ends ``stream`` with (-1 if absent: the
    expected text then cannot match)."""
    marker = f"{key} end ".encode()
    at = tail.rfind(marker)
    if at < 0:
        return -1
    number = tail[at + len(marker) :].strip()
    return int(number) if number.isdigit() else -1


def loop_command(key: str, stop: Path, pty: bool = False) -> Command:
    """Lines on stdout and stderr (stdout only under a PTY), ten at a time every 0.1 s,
    until ``stop`` exists; then ``end N`` on each stream."""
    out = f"printf '%s stdout %08d %s\\n' {key} $i '{FILLER}'"
    err = "" if pty else f"; printf '%s e %08d\\n' {key} $i >&2"
    end = f"printf '%s end %d\\n' {key} $i" + (
        "" if pty else f"; printf '%s end %d\\n' {key} $i >&2"
    )
    script = (
        f"i=0; while [ ! -e {stop} ]; do for j in 0 1 2 3 4 5 6 7 8 9; do "
        f"{out}{err}; i=$((i+1)); done; sleep 0.1; done; {end}"
    )
    return Command(key, script, 0, pty=pty, kind="loop")


def gated_exit_command(key: str, gate: Path, lines: int, how: str, code: int) -> Command:
    """``lines`` numbered lines, then wait for ``gate`` and end by ``how`` (``exit 7``,
    ``kill -USR1 $$``); ``code`` is the exit code that must be reported."""
    script = (
        f"for i in $(seq 1 {lines}); do echo \"{key} $i\"; done; echo '{key} waits' >&2; "
        f"while [ ! -e {gate} ]; do sleep 0.01; done; {how}"
    )
    stdout = "".join(f"{key} {i}\n" for i in range(1, lines + 1)).encode()
    return Command(key, script, code, stdout=stdout, stderr=f"{key} waits\n".encode())


def seq_command(key: str, size: int) -> Command:
    """``seq -w 1 N``: about ``size`` bytes of numbered lines, as fast as it can."""
    width = len(str(size // 8))
    n = size // (width + 1)
    return Command(key, f"seq -w 1 {n}", 0, kind="seq", seq_n=n)


def mismatches(
    command: Command, collected: dict[str, StreamDigest], exit_code: int | None, who: str
) -> list[str]:
    """What differs between what ``who`` collected of ``command`` and what it must be."""
    found = []
    for stream in ("stdout", "stderr"):
        got = collected[stream]
        want = digest(command.expected(stream, got.tail))
        if (got.length, got.hexdigest) != want:
            found.append(
                f"{who} {command.key} {stream}: {got.length} bytes sha {got.hexdigest[:12]}, "
                f"want {want[0]} sha {want[1][:12]} (tail {got.tail[-60:]!r})"
            )
    if exit_code != command.exit_code:
        found.append(f"{who} {command.key}: exit {exit_code}, want {command.exit_code}")
    return found
