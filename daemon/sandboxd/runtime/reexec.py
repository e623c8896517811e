"""The process side of a live upgrade: who this process is, what it re-execs, and the
sealed memfd that carries the state across ``execv``.

Shared by the old image (``upgrade.py``) and the new one (``resume.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from sandboxd.core.handover import HEADER_BYTES, MAX_SCHEMA_READ, Binding

#: Blocked from the final snapshot to the new image's handlers, so that none is lost
#: or acted on by a half-started image (a blocked signal stays pending across exec).
SWAP_SIGNALS = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGCHLD,
        signal.SIGWINCH,
    }
)

#: Test-only fault hooks (a comma list); see ``faults``.
FAULT_VARIABLE = "SANDBOXD_TEST_UPGRADE_FAULT"
#: The old image's argv, for a rollback from a new image that refuses the state.
ROLLBACK_VARIABLE = "SANDBOXD_UPGRADE_ROLLBACK"
#: The old image's environment (JSON), so that a rollback runs with it and not with
#: whatever the candidate (a wrapper, say) changed.
ROLLBACK_ENV_VARIABLE = "SANDBOXD_UPGRADE_ROLLBACK_ENV"
#: Why the new image rolled back (for the old image's ``last_upgrade``).
REASON_VARIABLE = "SANDBOXD_UPGRADE_REASON"
#: The listening fd, for a fresh start after a handover that failed both ways.
LISTEN_FD_VARIABLE = "SANDBOXD_UPGRADE_LISTEN_FD"
#: The name of the candidate written beside the running executable.
NEXT_NAME = "sandboxd.next"
#: The launcher of the single-file build exports its own path here.
ARTIFACT_VARIABLE = "SANDBOXD_ARTIFACT"


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``); "" where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22);
    0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (``/proc/<pid>/stat`` field 4); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def binding_of(pid: int) -> Binding:
    """The binding of a blob to process ``pid``."""
    return Binding(pid=pid, boot_id=boot_id(), start_ticks=start_ticks(pid))


def faults(environ: Mapping[str, str]) -> dict[str, str]:
    """The test fault hooks asked for: name -> value ("" when it has none)."""
    found: dict[str, str] = {}
    for item in environ.get(FAULT_VARIABLE, "").split(","):
        name, _, value = item.strip().partition("=")
        if name:
            found[name] = value
    return found


def damage(blob: bytes, wanted: Mapping[str, str]) -> bytes:
    """``blob`` as the fault hooks damage it (tests only)."""
    if "corrupt" in wanted and len(blob) > HEADER_BYTES:
        blob = blob[:-1] + bytes([blob[-1] ^ 0xFF])
    if "truncate" in wanted:
        blob = blob[: len(blob) // 2]
    if "newer-schema" in wanted and len(blob) >= 12:
        blob = blob[:8] + (MAX_SCHEMA_READ + 1).to_bytes(4, "little") + blob[12:]
    return blob


def write_sealed(blob: bytes, name: str = "sandboxd-handover") -> int:
    """A memfd holding ``blob`` at offset 0, sealed against any change (close-on-exec)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_all(fd: int) -> bytes:
    """Everything in the file at ``fd`` from offset 0 (the fd stays open)."""
    size = os.fstat(fd).st_size
    parts: list[bytes] = []
    offset = 0
    while offset < size:
        piece = os.pread(fd, min(size - offset, 1 << 24), offset)
        if not piece:
            break
        parts.append(piece)
        offset += len(piece)
    return b"".join(parts)


def interpreter_flags(orig_argv: Sequence[str]) -> list[str]:
    """The interpreter options of ``orig_argv`` (what comes before ``-m`` or the script)."""
    flags: list[str] = []
    items = iter(orig_argv[1:])
    for arg in items:
        if arg == "-m" or not arg.startswith("-") or arg in ("-c", "-"):
            break
        flags.append(arg)
        if arg in ("-W", "-X"):
            flags.append(next(items, ""))
    return flags


def own_program(daemon_args: Sequence[str]) -> list[str]:
    """The argv that runs this very daemon again from what is installed now."""
    if getattr(sys, "frozen", False):
        return [sys.executable, *daemon_args]
    return [sys.executable, *interpreter_flags(sys.orig_argv), "-m", "sandboxd", *daemon_args]


def installed_program(daemon_args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """What an upgrade without an artifact re-execs: the single-file build's artifact
    (its launcher unpacks the payload that is there now), else the interpreter with the
    same options loading the package installed now."""
    artifact = environ.get(ARTIFACT_VARIABLE, "")
    if getattr(sys, "frozen", False) and artifact:
        return [artifact, *daemon_args]
    return own_program(daemon_args)


def next_path(environ: Mapping[str, str]) -> str:
    """Where an uploaded candidate is written: beside the running executable/artifact."""
    artifact = environ.get(ARTIFACT_VARIABLE, "")
    base = artifact if getattr(sys, "frozen", False) and artifact else sys.executable
    return os.path.join(os.path.dirname(os.path.realpath(base)), NEXT_NAME)


def encode_argv(argv: Sequence[str]) -> str:
    """argv for an environment variable."""
    return json.dumps(list(argv))


def decode_argv(text: str) -> list[str] | None:
    """argv back from ``encode_argv``; None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


#: The variables a handover passes from one image to the next (the new image removes
#: them from its environment once it has read them).
HANDOVER_VARIABLES = (ROLLBACK_VARIABLE, ROLLBACK_ENV_VARIABLE, REASON_VARIABLE, LISTEN_FD_VARIABLE)


def encode_environ(environ: Mapping[str, str]) -> str:
    """An environment for an environment variable (without this module's own)."""
    return json.dumps({k: v for k, v in environ.items() if k not in HANDOVER_VARIABLES})


def decode_environ(text: str) -> dict[str, str] | None:
    """An environment back from ``encode_environ``; None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return value
    return None


def strip_internal(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``args`` without the internal upgrade options, and those options' values."""
    internal = ("--resume-fd", "--verify-state-fd", "--rollback-of")
    rest: list[str] = []
    found: dict[str, str] = {}
    items = iter(args)
    for arg in items:
        name, eq, value = arg.partition("=")
        if name in internal:
            found[name] = value if eq else next(items, "")
        else:
            rest.append(arg)
    return rest, found
