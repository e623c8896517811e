"""The state a live upgrade hands to the next image: typed data, sealed and bound.

The old image ``seal``s a ``HandoverState`` into bytes; the new one (same pid, after
``execv``) ``unseal``s them. Nothing here can run code: the payload is msgpack decoded by
msgspec into these structs only (``forbid_unknown_fields``), never pickle. Layout::

    MAGIC (8) | schema (u32 LE) | payload length (u64 LE) | sha256 of payload (32) | payload

The payload is ``_Envelope(binding, state)``. ``unseal`` refuses (``HandoverRefused``,
never another exception) a wrong magic, a schema newer than ``MAX_SCHEMA_READ``, a length
that does not match, a hash that does not match, a payload that does not decode, and a
binding that is not this process (pid, boot id and the process's start time in clock
ticks), so a stale or planted blob is never adopted.

Times cross as durations (seconds before the snapshot), never as trio clock values:
trio's clock has a random offset per run. ``snapshot_monotonic_ns`` (CLOCK_MONOTONIC,
which survives exec) lets the new image subtract the swap time.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Annotated

import msgspec

MAGIC = b"SBXD-HO\0"
#: The schema this code writes.
SCHEMA = 1
#: The newest schema this code reads.
MAX_SCHEMA_READ = 1

_HEADER = struct.Struct("<8sIQ32s")
HEADER_BYTES = _HEADER.size

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_Fd = Annotated[int, msgspec.Meta(ge=-1)]  # -1: no fd (closed, or never had one)


class HandoverRefused(Exception):
    """The blob cannot be adopted; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class Binding(_Strict):
    """The process a blob belongs to."""

    pid: int
    boot_id: str
    start_ticks: int


class RingState(_Strict):
    """One ring: the offset of its oldest retained byte and its chunks (valid UTF-8 each)."""

    capacity: Annotated[int, msgspec.Meta(ge=1)]
    start: _NonNegative
    chunks: list[bytes] = []


class StreamState(_Strict):
    """One output stream: its ring, the read end still open (-1: the pump ended) and the
    0-3 bytes of a split character the sanitiser holds back."""

    ring: RingState
    fd: _Fd = -1
    carry: Annotated[bytes, msgspec.Meta(max_length=3)] = b""


class ExitState(_Strict):
    """The leader's exit status as the reaper saw it."""

    code: int
    signal: int | None = None
    cpu_seconds: float = 0.0
    peak_rss_bytes: int | None = None


class CoreState(_Strict):
    """A ``core.session.Session`` without its clients; every time is seconds before the
    snapshot (``*_ago``) or after it (``grace_left``)."""

    command_id: str
    pid: int
    timeout_seconds: int
    idle_timeout_seconds: int
    ttl_seconds: int
    kill_on_disconnect: bool
    stall_seconds: float
    state: str  # "running" or "finished"
    started_ago: float
    idle_ago: float | None = None  # None: clients attached (or a grace): no idle clock
    ended_ago: float | None = None
    grace_left: float | None = None
    kill_reason: str | None = None
    end_reason: str | None = None
    status: ExitState | None = None
    #: A finished session whose TTL ran out while a client still read it: it crosses
    #: only for that client (out of the registry; an older image refuses the blob).
    expired: bool = False


class SessionRecord(_Strict):
    """Everything of one session a client can observe, and the fds that feed it."""

    core: CoreState
    command: str
    pty: bool
    started_wall: float
    stdout: StreamState
    stderr: StreamState
    proc_start_ticks: _NonNegative = 0  # 0: not recorded
    ended_wall: float | None = None
    reaped: ExitState | None = None  # reaped, perhaps not yet finished (draining)
    input_fd: _Fd = -1
    stdin_pending: bytes = b""
    stdin_closing: bool = False
    terminal_open: bool = False
    spawner_peak_kib: _NonNegative = 0
    #: A relayed PTY (runtime/spawn.py, "PTY relays"): stdout is the output relay's pipe,
    #: ``terminal_fd`` the master, input_fd a dup of it (or, from an older image, the input
    #: relay's pipe); a relay's pid is 0 once it was reaped (or there is none).
    terminal_fd: _Fd = -1
    output_relay: _NonNegative = 0
    input_relay: _NonNegative = 0

    @property
    def relayed(self) -> bool:
        """A PTY whose output and input pass through relays (not read directly)."""
        return bool(self.output_relay or self.input_relay or self.terminal_fd >= 0)


class UpgradeRecord(_Strict):
    """The outcome of the last upgrade, as ``/healthz`` shows it."""

    result: str  # ok, refused, rolled_back
    at: float
    from_version: str
    reason: str | None = None
    swap_ms: float | None = None
    to_version: str | None = None


class HandoverState(_Strict):
    """The whole daemon as it crosses an upgrade."""

    version: str
    generation: _NonNegative
    snapshot_monotonic_ns: int
    trigger_monotonic_ns: int
    listen_fd: _Fd
    rollback_argv: list[str]
    sessions: list[SessionRecord] = []
    expired_keys: list[int] = []
    commands_started: _NonNegative = 0
    orphans_reaped: _NonNegative = 0
    last_upgrade: UpgradeRecord | None = None
    last_read_monotonic_ns: int = 0


class _Envelope(_Strict):
    binding: Binding
    state: HandoverState


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Envelope)


def seal(state: HandoverState, binding: Binding, *, schema: int = SCHEMA) -> bytes:
    """``state`` as bytes bound to ``binding`` (``schema`` only for tests of refusals)."""
    payload = _encoder.encode(_Envelope(binding, state))
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, schema, len(payload), digest) + payload


def unseal(blob: bytes, binding: Binding) -> HandoverState:
    """The state in ``blob`` if it is intact and belongs to ``binding``; raises
    ``HandoverRefused`` otherwise (and nothing else)."""
    if len(blob) < HEADER_BYTES:
        raise HandoverRefused(f"truncated: {len(blob)} bytes, no whole header")
    magic, schema, length, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise HandoverRefused("not a handover blob (bad magic)")
    if schema > MAX_SCHEMA_READ or schema < 1:
        raise HandoverRefused(f"schema {schema} is not readable (this reads 1..{MAX_SCHEMA_READ})")
    payload = blob[HEADER_BYTES:]
    if len(payload) != length:
        raise HandoverRefused(f"truncated: payload {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise HandoverRefused("payload hash mismatch (corrupted)")
    try:
        envelope = _decoder.decode(payload)
    except Exception as exc:  # msgspec.DecodeError/ValidationError, or anything odd
        raise HandoverRefused(f"undecodable payload: {exc}") from None
    if envelope.binding != binding:
        found = envelope.binding
        raise HandoverRefused(
            f"bound to another process (pid {found.pid}, boot {found.boot_id}, "
            f"start {found.start_ticks}; this is pid {binding.pid}, boot {binding.boot_id}, "
            f"start {binding.start_ticks})"
        )
    return envelope.state
