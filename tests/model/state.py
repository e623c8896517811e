"""What the model knows about each session and each socket, and the check of every frame
a socket receives as it arrives (run after every step).

Per stream, one global byte sequence is what every socket must agree on: a chunk at
offset X carries exactly bytes X.. of it (for STREAM the program's known output, for ECHO
and SINK the bytes other sockets saw at the same offsets). A socket's chunks follow on
from its attach offset without a hole or an overlap, except at a ``gap`` frame, which must
start at the socket's cursor, and may appear only where bytes can have been evicted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from tests.model.client import Mode, ModelSocket
from tests.model.programs import Kind, Program

#: The daemon's ring per stream (``--ring-bytes``) and the largest chunk it appends at once
#: (a read of 64 KiB, plus up to 3 bytes the UTF-8 sanitiser held back from the last one).
RING = 128 * 1024
#: U+FFFD in UTF-8.
REPLACEMENT = "\ufffd".encode()
CHUNK = 64 * 1024 + 3
STREAMS = ("stdout", "stderr")


class Attach(Enum):
    """What a socket's binding frame must get: attached, refused as expired, or either
    (when the TTL may or may not have run out by the time it lands)."""

    ATTACHED = "attached"
    EXPIRED = "expired"
    EITHER = "either"


@dataclass
class Sent:
    """One frame a socket sent that the model tracks, in socket order."""

    kind: str  # "line", "close" (close_stdin, or EOT under a PTY), "resize"
    tag: str = ""
    size: tuple[int, int] = (0, 0)  # (rows, cols) of a resize


@dataclass(eq=False)
class SocketModel:
    """One client socket of one session."""

    ws: ModelSocket
    session: SessionModel
    role: str  # "execute", "execute-again", "reconnect", "auditor"
    offsets: tuple[int, int]
    expect: Attach
    after_finish: bool  # the session's end had been seen when the binding frame went out
    #: A ``reconnect`` sent before any socket received the command's ``started``: it may
    #: reach the daemon before the ``execute`` does, and then the id is not known yet.
    before_started: bool = False
    sent: list[Sent] = field(default_factory=list)
    seq: int = 0
    never_paused: bool = True
    checked: int = 0
    cursors: dict[str, int] = field(default_factory=dict)
    first_frame: dict[str, str] = field(default_factory=dict)  # stream -> "gap" / "data"
    refused: bool = False
    terminal: dict[str, Any] | None = None
    gaps: list[tuple[str, int, int]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<{self.name}: {self.role} of {self.session.command_id}>"

    def __post_init__(self) -> None:
        self.cursors = {"stdout": self.offsets[0], "stderr": self.offsets[1]}

    @property
    def name(self) -> str:
        return self.ws.name

    def next_tag(self, pad: int, query: bool = False) -> str:
        """A new input line (without its newline) that names this socket and its order."""
        self.seq += 1
        return f"{self.name}.{self.seq}" + ("x" * pad) + ("?" if query else "")

    def set_mode(self, mode: Mode) -> None:
        if mode is Mode.PAUSED:  # a slow reader still paces the command
            self.never_paused = False
            self.session.unprotect()
        self.ws.set_mode(mode)


@dataclass(eq=False)
class SessionModel:
    """One command as the model sees it."""

    command_id: str
    program: Program
    ttl: int
    spawn_closed: bool  # close_stdin at execute, without a PTY: stdin is at EOF from the start
    spawned_at: float
    sockets: list[SocketModel] = field(default_factory=list)
    pid: int | None = None
    kills: int = 0
    signals: list[int] = field(default_factory=list)
    known: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in STREAMS})
    terminal: dict[str, Any] | None = None
    ended_seen: float | None = None  # when a socket first received the terminal frame
    unprotected_since: float = math.inf
    #: Where a stream ended in the U+FFFD of a character its killed writer cut short.
    cut_at: dict[str, int] = field(default_factory=dict)

    def unprotect(self) -> None:
        """From now on the execute socket is no longer the one client that paces alone."""
        self.unprotected_since = min(self.unprotected_since, time.monotonic())

    @property
    def expected(self) -> tuple[bytes, bytes] | None:
        """The whole output, when the program's output does not depend on its input."""
        if self.program.kind is Kind.STREAM:
            return self.program.stream_output()
        if self.program.kind is Kind.SINK:
            return self.program.sink_output(), b""
        return None

    def ended(self) -> bool:
        """Some socket has seen the command's terminal frame."""
        return self.terminal is not None

    def ready(self) -> bool:
        """Input may be sent: no PTY, or the program said it turned the echo off (STREAM
        never does: under a PTY its terminal would echo the input into its output)."""
        marker = self.program.ready
        if marker is None:
            return not self.program.pty
        known = self.known["stdout"]
        return all(known.get(i) == b for i, b in enumerate(marker.encode()))

    def prefix(self, stream: str) -> bytes:
        """The stream's bytes from 0 as far as sockets saw them without a hole."""
        known, out = self.known[stream], bytearray()
        while len(out) in known:
            out.append(known[len(out)])
        return bytes(out)

    def stream_text(self, stream: str) -> bytes | None:
        """The stream's bytes from 0 to the end, when every one of them was seen."""
        known = self.known[stream]
        end = self.stream_end(stream)
        if end is None or any(i not in known for i in range(end)):
            return None
        return bytes(known[i] for i in range(end))

    def stream_end(self, stream: str) -> int | None:
        """Where the stream ended, as the sockets that got the terminal frame saw it."""
        ends = {s.cursors[stream] for s in self.sockets if s.terminal is not None and not s.refused}
        assert len(ends) <= 1, f"{self.command_id}: sockets disagree on where {stream} ends: {ends}"
        return ends.pop() if ends else None

    # ---- the check of each frame as it arrives ------------------------------------------

    def audit(self) -> None:
        """Check the frames every socket received since the last audit."""
        for sock in self.sockets:
            for received in sock.ws.frames()[sock.checked :]:
                self._check(sock, received.frame, received.at)
                sock.checked += 1

    def _check(self, sock: SocketModel, frame: dict[str, Any], at: float) -> None:
        where = f"{sock.name} ({sock.role} of {self.command_id}, frame {sock.checked})"
        kind = frame.get("type")
        if sock.checked == 0:
            if kind == "error" and frame.get("error_type") == "SessionExpired":
                assert sock.expect is not Attach.ATTACHED, f"{where}: refused as expired: {frame}"
                sock.refused = True
                sock.terminal = frame
                return
            if kind == "error" and frame.get("error_type") == "CommandNotFound":
                assert sock.before_started, (
                    f"{where}: {frame}, but the command's started frame had been received "
                    "before this socket's reconnect was sent"
                )
                sock.refused = True
                sock.terminal = frame
                return
            assert sock.expect is not Attach.EXPIRED, f"{where}: attached after the TTL: {frame}"
            assert kind == "started", f"{where}: the first frame is not started: {frame}"
            assert frame["command_id"] == self.command_id, f"{where}: {frame}"
            if self.pid is None:
                self.pid = frame["pid"]
            assert frame["pid"] == self.pid, f"{where}: another pid: {frame} (was {self.pid})"
            return
        assert sock.terminal is None, f"{where}: a frame after the terminal one: {frame}"
        if kind in STREAMS:
            self._check_chunk(sock, kind, frame, where)
        elif kind == "gap":
            self._check_gap(sock, frame, at, where)
        elif kind in ("exit", "error"):
            sock.terminal = frame
            if self.terminal is None:
                self.terminal, self.ended_seen = frame, at
            assert frame == self.terminal, (
                f"{where}: {frame} but another socket got {self.terminal}"
            )
        else:
            raise AssertionError(f"{where}: unexpected frame {frame}")

    def _check_chunk(
        self, sock: SocketModel, stream: str, frame: dict[str, Any], where: str
    ) -> None:
        offset, data = frame["offset"], frame["data"].encode()
        cut = self.cut_at.get(stream)
        assert cut is None or offset < cut, (
            f"{where}: {stream} chunk at {offset} after the U+FFFD that ended the stream at {cut}"
        )
        assert offset == sock.cursors[stream], (
            f"{where}: {stream} chunk at {offset}, but this client's cursor is at "
            f"{sock.cursors[stream]} (a hole or an overlap)"
        )
        assert data, f"{where}: an empty {stream} chunk"
        sock.first_frame.setdefault(stream, "data")
        sock.cursors[stream] = offset + len(data)
        expected = self.expected
        if expected is not None:
            whole = expected[STREAMS.index(stream)]
            want = whole[offset : offset + len(data)]
            if data != want and self._cut_inside_a_character(stream, offset, data, whole):
                return
            assert data == want, (
                f"{where}: {stream} bytes {offset}..{offset + len(data)} are {data[:80]!r}..., "
                f"the program printed {want[:80]!r}..."
            )
            return
        known = self.known[stream]
        for i, byte in enumerate(data, offset):
            seen = known.setdefault(i, byte)
            assert seen == byte, f"{where}: {stream} byte {i} differs from another socket's"

    def _cut_inside_a_character(self, stream: str, offset: int, data: bytes, whole: bytes) -> bool:
        """Whether ``data`` is the program's output up to a character that a kill or a
        signal cut short, and then the U+FFFD that an incomplete character at the end of
        a stream becomes (protocol.md, invalid UTF-8: a killed writer's last write can stop
        inside a character when the pipe was full). Nothing may follow it."""
        body = len(data) - len(REPLACEMENT)
        if not (self.kills or self.signals) or not data.endswith(REPLACEMENT):
            return False
        lead = whole[offset + body : offset + body + 1]
        if data[:body] != whole[offset : offset + body] or not lead or lead[0] < 0xC2:
            return False  # not a multi-byte character the program began to print
        self.cut_at[stream] = offset + len(data)
        return True

    def _check_gap(self, sock: SocketModel, frame: dict[str, Any], at: float, where: str) -> None:
        stream = frame.get("stream")
        assert stream in STREAMS, f"{where}: {frame}"
        start, end = frame["from"], frame["to"]
        assert start == sock.cursors[stream], (
            f"{where}: gap from {start}, but this client's cursor is at {sock.cursors[stream]}"
        )
        assert end > start, f"{where}: an empty gap {frame}"
        expected = self.expected
        total = len(expected[STREAMS.index(stream)]) if expected is not None else 0
        assert total > RING, (
            f"{where}: {frame}, but {stream} of this command ({total} bytes at most) "
            f"fits in the {RING}-byte ring: nothing can have been evicted"
        )
        assert end <= total, f"{where}: {frame} goes past the end of the output ({total})"
        alone = sock.role == "execute" and sock.never_paused and at < self.unprotected_since
        assert not alone, (
            f"{where}: {frame}, but this client was the only one, reading as fast as it "
            "could: the daemon paces the command to it, so nothing it needs may be evicted"
        )
        if sock.after_finish and self.natural_end():
            # Finished: the ring holds the last RING bytes, less at most one chunk.
            assert total - RING <= end < total - RING + CHUNK, (
                f"{where}: {frame} after the end, but the ring holds {stream} from "
                f"{total - RING}..{total - RING + CHUNK} on"
            )
        sock.first_frame.setdefault(stream, "gap")
        sock.gaps.append((stream, start, end))
        sock.cursors[stream] = end

    def natural_end(self) -> bool:
        """The terminal seen so far says the program exited by itself."""
        t = self.terminal
        return t is not None and t.get("reason") == "exited" and t.get("signal") is None
