"""The messages of ``/execute/ws`` (protocol.md §2.3, §2.4) as msgspec tagged unions.

One decoder and one encoder are built at import. A frame that does not decode becomes
``InvalidRequest`` with msgspec's own account of what is wrong and where, e.g.
``Expected `int`, got `str` - at `$.timeout_seconds```.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from sandboxd.core.errors import InvalidRequest

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
COMMAND_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RunConfig(msgspec.Struct, forbid_unknown_fields=False):
    """Per-command user, work dir and environment (``run_config`` of ``execute``)."""

    user: str | None = None
    work_dir: str | None = None
    env_vars: dict[str, str] | None = None


# ---- client -> server -------------------------------------------------------------


WindowSide = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Execute(msgspec.Struct, tag="execute", tag_field="type"):
    """Start a command, or attach to the one already known under ``command_id``.

    ``cols`` and ``rows`` (a sandboxd extension the SDKs never send) give a PTY command
    its window size from the start; without them it gets ``--pty-cols``/``--pty-rows``.
    """

    command: str
    command_id: str | None = None
    timeout_seconds: int = 60
    shell: str = "/bin/bash"
    idle_timeout_seconds: int = 300
    kill_on_disconnect: bool = False
    ttl_seconds: int = 600
    env: dict[str, str] | None = None
    cwd: str | None = None
    run_config: RunConfig | None = None
    close_stdin: bool = False
    pty: bool = False
    cols: WindowSide | None = None
    rows: WindowSide | None = None


class Reconnect(msgspec.Struct, tag="reconnect", tag_field="type"):
    """Attach to a known command and resume each stream from a byte offset.

    ``watch`` (a sandboxd extension the SDKs never send) attaches read-only, as a watcher
    that is not a client for the idle clock or ``kill_on_disconnect`` (``session.py``);
    its ``input``, ``close_stdin`` and ``resize`` frames are refused (``read_only_refusal``).
    """

    command_id: str
    stdout_offset: NonNegative = 0
    stderr_offset: NonNegative = 0
    watch: bool = False


class Input(msgspec.Struct, tag="input", tag_field="type"):
    """Text for the command's stdin (or its terminal)."""

    data: str


class CloseStdin(msgspec.Struct, tag="close_stdin", tag_field="type"):
    """Half-close the command's stdin."""


class Kill(msgspec.Struct, tag="kill", tag_field="type"):
    """SIGKILL the command's whole process tree."""


class Signal(msgspec.Struct, tag="signal", tag_field="type"):
    """Send any signal (``"INT"``, ``"SIGUSR1"`` or a number) to the process group."""

    signal: str | int


class Resize(msgspec.Struct, tag="resize", tag_field="type"):
    """Set a PTY command's window size."""

    cols: WindowSide
    rows: WindowSide


ClientMessage = Execute | Reconnect | Input | CloseStdin | Kill | Signal | Resize
ControlMessage = Input | CloseStdin | Kill | Signal | Resize
#: What a watching attachment may not send: the frames that write to the command.
WRITING_MESSAGES = (Input, CloseStdin, Resize)

_decoder = msgspec.json.Decoder(ClientMessage)


def decode_client(frame: str | bytes) -> ClientMessage:
    """Decode one client frame; raises ``InvalidRequest`` saying what is wrong."""
    try:
        message: ClientMessage = _decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"bad message: {exc}") from None
    return message


def validate_execute(msg: Execute) -> None:
    """Refuse an ``execute`` whose fields contradict each other (protocol.md §2.7.8, §11).

    Raises ``InvalidRequest`` before anything is spawned.
    """
    if msg.run_config is not None and (msg.env is not None or msg.cwd is not None):
        raise InvalidRequest("run_config cannot be combined with the legacy env/cwd fields")
    if msg.command_id is not None and not COMMAND_ID_PATTERN.fullmatch(msg.command_id):
        raise InvalidRequest("command_id must be 1-128 characters of [A-Za-z0-9._:-]")
    work_dir = msg.run_config.work_dir if msg.run_config else msg.cwd
    if work_dir is not None and work_dir != "" and not work_dir.startswith("/"):
        raise InvalidRequest(f"work_dir must be an absolute path, got {work_dir!r}")
    if msg.timeout_seconds < 0:
        raise InvalidRequest("timeout_seconds must be >= 0 (0 = no deadline)")
    if msg.idle_timeout_seconds < -1:
        raise InvalidRequest("idle_timeout_seconds must be >= -1 (-1 or 0 = never)")
    if msg.ttl_seconds < -1:
        raise InvalidRequest("ttl_seconds must be >= -1 (-1 = forever)")
    if "\0" in msg.command or "\0" in msg.shell:
        raise InvalidRequest("command and shell must not contain NUL bytes")


# ---- server -> client -------------------------------------------------------------


class Started(msgspec.Struct, tag="started", tag_field="type"):
    """First frame on every bound socket: the command's id and pid."""

    command_id: str
    pid: int


class Stdout(msgspec.Struct, tag="stdout", tag_field="type"):
    """A chunk of stdout starting at byte ``offset`` of the stream."""

    data: str
    offset: int


class Stderr(msgspec.Struct, tag="stderr", tag_field="type"):
    """A chunk of stderr starting at byte ``offset`` of the stream."""

    data: str
    offset: int


class Gap(msgspec.Struct, tag="gap", tag_field="type"):
    """Bytes ``from`` to ``to`` of ``stream`` were evicted before this client read them."""

    stream: Literal["stdout", "stderr"]
    from_: int = msgspec.field(name="from")
    to: int = 0


class Exit(msgspec.Struct, tag="exit", tag_field="type"):
    """Terminal: the command ended. ``exit_code`` is 128+N for a death by signal N.

    ``peak_rss_bytes`` is null when the command stayed below what the kernel lets us
    measure (see ``process.exit_status``).
    """

    exit_code: int
    signal: str | None = None
    reason: str = "exited"
    cpu_seconds: float = 0.0
    peak_rss_bytes: int | None = None


class Error(msgspec.Struct, tag="error", tag_field="type"):
    """Terminal: the request failed, or the command timed out."""

    error_type: str
    error: str


ServerMessage = Started | Stdout | Stderr | Gap | Exit | Error


def read_only_refusal(message: ControlMessage) -> Error | None:
    """The ``error`` frame a watching attachment gets for ``message``; None if allowed.

    The refusal is not terminal: the socket stays open and the command is untouched.
    """
    if not isinstance(message, WRITING_MESSAGES):
        return None
    tag = type(message).__struct_config__.tag
    return Error(
        error_type="InvalidRequest",
        error=f"read-only attachment: {tag} is not allowed on a watching reconnect",
    )


_encoder = msgspec.json.Encoder()


def encode_text(msg: ServerMessage) -> str:
    """One server message as the text of a WebSocket frame."""
    return _encoder.encode(msg).decode()


def encode(msg: ServerMessage) -> bytes:
    """One server message as the UTF-8 JSON payload of a WebSocket text frame."""
    return _encoder.encode(msg)
