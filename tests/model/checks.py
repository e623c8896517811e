"""The checks at the end of an example, once every command has ended: what stdin received,
what the exit frame says, and that every socket got the whole output from its offsets.

Where the daemon may legitimately do one of several things, the check accepts exactly
that set:

* stdin: frames from one socket arrive in that socket's order; frames from different
  sockets may interleave in any way. EOF comes from the first close that lands, so a
  socket's lines sent before its own close all arrive if its close was the one that
  ended stdin, and lines of other sockets may have been cut off by it. A reset socket's
  frames may stop anywhere (an RST can discard what the daemon had not read yet).
* the end: the program's own exit when it can end by itself, else (or also) the kill or
  any one of the signals that were sent.
* a PTY's ``stty size``: the latest size its own socket set before asking, or any size
  set by another socket (no order holds across sockets) or by it later.
"""

from __future__ import annotations

import signal
from typing import Any

from tests.model.programs import Kind, signal_name
from tests.model.state import CHUNK, RING, STREAMS, Sent, SessionModel, SocketModel

INITIAL_SIZE = (24, 80)


def allowed_ends(session: SessionModel) -> list[dict[str, Any]]:
    """Every (exit_code, signal, reason) the command may end with."""
    program = session.program
    ends = []
    closes = any(s.kind == "close" for sock in session.sockets for s in sock.sent)
    natural = program.kind is Kind.STREAM or (
        program.kind is Kind.ECHO and (session.spawn_closed or closes)
    )
    if natural:
        ends.append({"exit_code": program.code, "signal": None, "reason": "exited"})
    if session.kills:
        ends.append({"exit_code": 137, "signal": "KILL", "reason": "killed"})
    for signo in session.signals:
        reasons = ["exited", "killed"] if session.kills else ["exited"]
        for reason in reasons:
            ends.append({"exit_code": 128 + signo, "signal": signal_name(signo), "reason": reason})
    return ends


def check_end(session: SessionModel) -> None:
    """The terminal frame is one the model allows."""
    terminal = session.terminal
    assert terminal is not None, f"{session.command_id}: no socket saw the command end"
    assert terminal["type"] == "exit", f"{session.command_id}: {terminal}"
    got = {k: terminal.get(k) for k in ("exit_code", "signal", "reason")}
    allowed = allowed_ends(session)
    assert got in allowed, (
        f"{session.command_id} ({session.program}): ended with {got}; the model allows "
        f"{allowed} (kills sent: {session.kills}, signals sent: {session.signals})"
    )


def check_sockets(session: SessionModel) -> None:
    """Every socket that stayed to the end got every byte from its offsets, then the
    terminal frame and a normal close; one refused (expired, or sent before
    the command was known) got only that."""
    expected = session.expected
    for sock in session.sockets:
        where = f"{sock.name} ({sock.role} of {session.command_id})"
        if sock.refused:
            assert sock.ws.types() == ["error"], f"{where}: {sock.ws.types()}"
            assert sock.ws.close_code == 1000, f"{where}: close code {sock.ws.close_code}"
            continue
        if sock.ws.left is not None and sock.terminal is None:
            continue  # it left before the end: what it got was checked frame by frame
        assert sock.terminal is not None, f"{where}: no terminal frame, got {sock.ws.types()[-5:]}"
        # A socket the client reset itself after the terminal frame may not have read the
        # close frame behind it yet; whatever close it read is 1000.
        unread = sock.ws.left == "reset" and sock.ws.close_code is None
        assert unread or sock.ws.close_code == 1000, (
            f"{where}: close code {sock.ws.close_code} (the reader stopped: "
            f"{sock.ws.end_reason or 'not yet'}; left: {sock.ws.left})"
        )
        for i, stream in enumerate(STREAMS):
            end = session.stream_end(stream)
            assert sock.cursors[stream] == end, f"{where}: {stream} stopped at {sock.cursors}"
            if expected is not None and session.natural_end():
                assert end == len(expected[i]), (
                    f"{where}: {stream} ended at {end}, the program printed {len(expected[i])}"
                )
            elif expected is not None:
                assert end is not None and end <= len(expected[i]), f"{where}: {stream} {end}"
            for gap_stream, start, to in sock.gaps:
                # After any eviction the ring still holds more than RING - CHUNK bytes,
                # and every byte ever read is counted in ``end``.
                assert gap_stream != stream or end is None or to < end - (RING - CHUNK), (
                    f"{where}: gap {start}..{to} of {stream}, but the ring always keeps the "
                    f"last {RING - CHUNK} bytes of the {end} written"
                )
            if sock.after_finish and session.natural_end() and end is not None:
                start = sock.offsets[i]
                if start < end - RING:
                    assert sock.first_frame.get(stream) == "gap", (
                        f"{where}: reattached at {stream} {start}, older than the ring "
                        f"(which starts at {end - RING} or later), without a gap frame"
                    )


# ---- ECHO: what stdin received ------------------------------------------------------------


def parse_echo(
    session: SessionModel,
) -> tuple[list[str], list[tuple[str, tuple[int, int]]], bool] | None:
    """ECHO's output as (lines it read, the sizes ``stty size`` printed, EOF seen); None
    when some of the output was never seen by any socket."""
    out = session.stream_text("stdout")
    err = session.stream_text("stderr")
    if out is None or err is None:
        return None
    where = f"{session.command_id} (echo)"
    pty = session.program.pty
    nl = "\r\n" if pty else "\n"
    text = out.decode()
    killed = not session.natural_end()
    if pty:
        assert err == b"", f"{where}: stderr under a PTY: {err[:100]!r}"
        assert text.startswith("ready" + nl) or (killed and "ready\r\n".startswith(text)), text
        text = text[len("ready" + nl) :]
    lines = text.split(nl)
    tail = lines.pop()
    assert tail == "" or killed, f"{where}: output ends inside a line: {tail!r}"
    tags: list[str] = []
    sizes: list[tuple[str, tuple[int, int]]] = []
    eof = False
    i = 0
    while i < len(lines):
        line = lines[i]
        assert not eof, f"{where}: output after 'eof': {lines[i:]}"
        if line.startswith("eof "):
            assert line == f"eof {len(tags)}", f"{where}: {line!r} after {len(tags)} lines"
            eof = True
            i += 1
            continue
        number, _, tag = line.partition(" ")
        assert number == str(len(tags) + 1), f"{where}: line {len(tags) + 1} is {line!r}"
        tags.append(tag)
        i += 1
        if pty and tag.endswith("?") and i < len(lines):
            rows, _, cols = lines[i].partition(" ")
            assert rows.isdigit() and cols.isdigit(), f"{where}: stty size gave {lines[i]!r}"
            sizes.append((tag, (int(rows), int(cols))))
            i += 1
        if pty and i < len(lines):
            assert lines[i] == f"err {len(tags)}", f"{where}: {lines[i]!r} after line {tag!r}"
            i += 1
    if not pty:
        errs = err.decode().split("\n")
        assert errs.pop() == "", f"{where}: stderr ends inside a line"
        assert errs == [f"err {n}" for n in range(1, len(errs) + 1)], f"{where}: {errs[:5]}"
        assert len(errs) == len(tags) or (killed and len(errs) == len(tags) - 1), (
            f"{where}: {len(tags)} lines echoed on stdout, {len(errs)} on stderr"
        )
    assert eof or killed, f"{where}: exited by itself without reaching EOF"
    return tags, sizes, eof


def check_stdin(session: SessionModel, tags: list[str], eof: bool) -> None:
    """The lines the program read are a merge of each socket's lines in that socket's
    order, cut where the model allows (see the module docstring)."""
    where = f"{session.command_id} stdin"
    by_name = {sock.name: sock for sock in session.sockets}
    assert len(set(tags)) == len(tags), f"{where}: a line arrived twice: {tags}"
    got: dict[str, list[str]] = {name: [] for name in by_name}
    for tag in tags:
        name = tag.split(".", 1)[0]
        assert name in by_name, f"{where}: a line nobody sent: {tag!r}"
        got[name].append(tag)
    if session.spawn_closed:
        assert tags == [], f"{where}: stdin was closed at spawn, yet the program read {tags}"
        return
    closers = []
    for name, sock in by_name.items():
        lines = [s.tag for s in sock.sent if s.kind == "line"]
        mine = got[name]
        if sock.refused:  # the daemon must not act on a refused socket's frames
            assert mine == [], f"{where}: {name} was refused, yet its lines arrived: {mine}"
            continue
        assert mine == lines[: len(mine)], (
            f"{where}: {name}'s lines arrived as {mine}; it sent them as {lines} "
            "(out of order, or one was lost)"
        )
        before = _lines_before_close(sock.sent)
        if before is not None:
            assert len(mine) <= before, (
                f"{where}: {name} sent close_stdin after {before} lines, yet {len(mine)} arrived"
            )
            closers.append((name, before, len(mine)))
    if eof:
        assert any(n == before for _, before, n in closers), (
            f"{where}: the program reached EOF, but no socket's lines before its close all "
            f"arrived: (socket, lines before its close, lines that arrived) = {closers}; "
            f"read in order: {tags}"
        )


def _lines_before_close(sent: list[Sent]) -> int | None:
    count = 0
    for s in sent:
        if s.kind == "close":
            return count
        if s.kind == "line":
            count += 1
    return None


def check_sizes(session: SessionModel, sizes: list[tuple[str, tuple[int, int]]]) -> None:
    """Each ``stty size`` answer is one the resizes sent allow."""
    asked = {s.tag: (sock, i) for sock in session.sockets for i, s in enumerate(sock.sent)}
    for tag, size in sizes:
        sock, index = asked[tag]
        allowed = _allowed_sizes(session, sock, index)
        assert size in allowed, (
            f"{session.command_id}: stty size after {tag!r} said {size}; allowed {allowed}"
        )


def _allowed_sizes(session: SessionModel, asker: SocketModel, index: int) -> set[tuple[int, int]]:
    own_before = [s.size for s in asker.sent[:index] if s.kind == "resize"]
    allowed = {own_before[-1]} if own_before else {INITIAL_SIZE}
    allowed |= {s.size for s in asker.sent[index:] if s.kind == "resize"}
    for sock in session.sockets:
        if sock is not asker:
            allowed |= {s.size for s in sock.sent if s.kind == "resize"}
    return allowed


def check_session(session: SessionModel) -> None:
    """Everything the model can say about one ended command."""
    session.audit()
    check_sockets(session)
    if session.terminal is None:  # every socket left early or was refused: nobody saw it
        assert all(s.refused or s.ws.left is not None for s in session.sockets), session
        return
    check_end(session)
    if session.program.kind is Kind.ECHO:
        parsed = parse_echo(session)
        if parsed is not None:
            tags, sizes, eof = parsed
            check_stdin(session, tags, eof)
            if session.program.pty:
                check_sizes(session, sizes)


assert signal.SIGKILL == 9  # 137 = 128 + SIGKILL in allowed_ends
