"""What the state machine's rules share: opening sockets and binding them, sending input
lines, waiting for effects, and the end of an example (every command is ended, every
socket drained, then the final checks and the look for anything left behind).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, ClassVar

from hypothesis import event
from hypothesis.control import currently_in_test_context

from tests.model import observe
from tests.model.checks import check_session
from tests.model.client import Mode, ModelSocket
from tests.model.programs import Kind
from tests.model.state import Attach, Sent, SessionModel, SocketModel
from tests.sdk.conftest import DaemonProcess

#: A kill or signal must take effect within a second; this much more is allowed for a
#: loaded machine.
WITHIN = 1.0
SLACK = 1.0
LONG_TTL = 120


class Driver:
    """The model's side of every example."""

    daemon: ClassVar[DaemonProcess]
    fd_baseline: ClassVar[int] = 0

    def __init__(self) -> None:
        self.sessions: list[SessionModel] = []
        self.socks: list[SocketModel] = []
        self.findings: list[tuple[str, Exception]] = []
        self.names = itertools.count(1)

    # ---- sockets --------------------------------------------------------------------

    def open_socket(
        self, session: SessionModel, role: str, offsets: tuple[int, int]
    ) -> SocketModel:
        """A new socket for ``session``, not yet bound."""
        session.audit()
        expect = expectation(session) if role != "execute" else Attach.ATTACHED
        ws = ModelSocket(self.daemon.address, f"s{next(self.names)}")
        sock = SocketModel(ws, session, role, offsets, expect, session.ended())
        sock.before_started = role in ("reconnect", "auditor") and session.pid is None
        if role != "execute":
            session.unprotect()
        session.sockets.append(sock)
        self.socks.append(sock)
        return sock

    def lines(
        self, sock: SocketModel, count: int, pad: int, query: bool = False
    ) -> list[dict[str, Any]]:
        """``count`` new input frames of one line each, recorded as sent by ``sock``."""
        frames = []
        for _ in range(count):
            tag = sock.next_tag(pad, query)
            sock.sent.append(Sent("line", tag))
            frames.append({"type": "input", "data": tag + "\n"})
        return frames

    def bind(self, sock: SocketModel, close_first: bool, pipelined: int, trickle: bool) -> None:
        """Send the binding frame (``reconnect``, or ``execute`` again), maybe after a
        ``close_stdin`` (protocol.md 2.3.6) and with input lines right behind it."""
        session = sock.session
        frames: list[dict[str, Any]] = []
        if close_first and not session.program.pty:
            sock.sent.append(Sent("close"))
            frames.append({"type": "close_stdin"})
        if sock.role == "execute-again":
            frames.append(
                {
                    "type": "execute",
                    "command": "echo this must not run",
                    "command_id": session.command_id,
                    "close_stdin": True,  # ignored: the command exists
                    "ttl_seconds": 0,
                }
            )
        else:
            frames.append(
                {
                    "type": "reconnect",
                    "command_id": session.command_id,
                    "stdout_offset": sock.offsets[0],
                    "stderr_offset": sock.offsets[1],
                }
            )
        behind = self.lines(sock, pipelined, 0) if session.ready() else []
        self.send_behind(sock, frames, behind, trickle)

    @staticmethod
    def send_behind(
        sock: SocketModel, frames: list[dict[str, Any]], behind: list[dict[str, Any]], trickle: bool
    ) -> None:
        """``frames`` in one write, then ``behind`` in the same write or one frame per
        write, a millisecond apart (landing while the daemon binds the socket)."""
        if trickle:
            sock.ws.send(*frames)
            for frame in behind:
                time.sleep(0.001)
                sock.ws.send(frame)
        else:
            sock.ws.send(*frames, *behind)

    # ---- effects --------------------------------------------------------------------

    def ends_soon(self, session: SessionModel, what: str) -> None:
        """The command is reaped within ``WITHIN`` (+ ``SLACK``) seconds."""
        elapsed = observe.seconds_until_reaped(self.daemon.address, session.command_id, 4.0)
        assert elapsed <= WITHIN + SLACK, (
            f"{session.command_id} ({session.program}): {what} took effect after "
            f"{elapsed:.2f} s (allowed: {WITHIN} s, plus {SLACK} s for a loaded machine)"
        )

    def round_trip(self, sock: SocketModel) -> None:
        """Send a line to ECHO and wait until it comes back (then every earlier line of
        this socket arrived before it); nothing when the model cannot expect it back."""
        session = sock.session
        session.audit()
        open_stdin = not session.spawn_closed and not any(
            s.kind == "close" for other in session.sockets for s in other.sent
        )
        reading = any(s.ws.mode is not Mode.PAUSED and s.ws.left is None for s in session.sockets)
        usable = session.program.kind is Kind.ECHO and open_stdin and not session.kills
        if not (usable and reading and not session.signals and session.ready()):
            return
        if sock.ws.left is not None or sock.refused or session.ended():
            return
        (frame,) = self.lines(sock, 1, 0)
        tag = frame["data"].strip()
        sock.ws.send(frame)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            session.audit()
            if session.ended() or f" {tag}".encode() in session.prefix("stdout"):
                return
            time.sleep(0.02)
        raise AssertionError(
            f"{session.command_id}: input line {tag!r} from {sock.name} never came back"
        )

    # ---- the end of an example --------------------------------------------------------

    def end_example(self) -> None:
        """End every command, drain every socket, check everything; raise the first
        finding of the example, if any."""
        try:
            if not self.findings:
                self._finish()
        except Exception as exc:
            self.findings.append(("teardown", exc))
        finally:
            self._clean_up()
        if self.findings:
            # The first finding itself, so that hypothesis tells different ones apart
            # (by where they were raised) and reports each.
            where, first = self.findings[0]
            first.add_note(f"(found in step {where}; {len(self.findings) - 1} more after it)")
            raise first

    def _finish(self) -> None:
        for sock in self.socks:
            sock.set_mode(Mode.FAST)
        for session in self.sessions:
            self._wait_for_started(session)
            if session.ended() and session.ttl >= LONG_TTL:
                self.bind(self.open_socket(session, "auditor", (0, 0)), False, 0, False)
            elif not session.ended():
                auditor = self.open_socket(session, "auditor", (0, 0))
                self.bind(auditor, False, 0, False)
                self._end(session, auditor)
        deadline = time.monotonic() + 30
        for sock in self.socks:
            left = max(0.0, deadline - time.monotonic())
            assert sock.ws.wait_for(lambda ws: ws.finished, left), (
                f"{sock.name} ({sock.role} of {sock.session.command_id}): no end after 30 s; "
                f"last frames {sock.ws.types()[-5:]}"
            )
        for sock in self.socks:
            sock.ws.close_clean()
        for session in self.sessions:
            check_session(session)
            self._note(session)
        self._nothing_left()

    @staticmethod
    def _wait_for_started(session: SessionModel) -> None:
        """Until some socket received the command's ``started`` (as long as one still
        can): an auditor sent before it could reach the daemon ahead of the ``execute``,
        be told CommandNotFound, and leave the command running."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            session.audit()
            waiting = [s for s in session.sockets if s.ws.left is None and not s.ws.finished]
            if session.pid is not None or session.ended() or not waiting:
                return
            time.sleep(0.01)

    def _end(self, session: SessionModel, auditor: SocketModel) -> None:
        program = session.program
        if program.kind is Kind.STREAM:
            return
        auditor.ws.wait_for(lambda ws: ws.frames(), 10)
        deadline = time.monotonic() + 5
        while program.pty and not session.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
            session.audit()
        if program.kind is Kind.ECHO and session.ready():
            # Every open socket's lines come back first: then the stdin check is exact.
            for sock in session.sockets:
                if sock is not auditor:
                    self.round_trip(sock)
            closer = next(
                (s for s in session.sockets if s.role == "execute" and s.ws.left is None),
                auditor,
            )
            closer.sent.append(Sent("close"))
            eof = {"type": "input", "data": "\x04"} if program.pty else {"type": "close_stdin"}
            closer.ws.send(eof)
        else:
            session.kills += 1
            auditor.ws.send({"type": "kill"})

    def _note(self, session: SessionModel) -> None:
        """Statistics (``--hypothesis-show-statistics``)."""
        if not currently_in_test_context():
            return
        program = session.program
        event(f"{program.kind.value}{' pty' if program.pty else ''} ttl={session.ttl}")
        end = session.terminal or {}
        event(f"ended: {end.get('reason')} {end.get('signal')}")
        if any(s.gaps for s in session.sockets):
            event("a socket saw a gap")
        if len(session.sockets) > 2:
            event("three or more sockets on one command")

    def _nothing_left(self) -> None:
        address, pid = self.daemon.address, self.daemon.process.pid
        ids = {s.command_id for s in self.sessions}

        def running() -> list[str]:
            listed = observe.sessions(address)
            return [i for i, row in listed.items() if i in ids and row["state"] == "running"]

        still = observe.settle(running, 5)
        assert not still, f"sessions still running after every client saw them end: {still}"
        gone = {s.command_id for s in self.sessions if s.ttl == 0}
        kept = observe.settle(lambda: sorted(gone & set(observe.sessions(address))), 5)
        assert not kept, f"ttl_seconds 0, yet still listed after the end: {kept}"
        children = observe.settle(lambda: observe.live_children(pid), 5)
        assert not children, f"processes left behind: {[c.cmdline() for c in children]}"
        fds = observe.settle(lambda: max(0, observe.fd_count(pid) - self.fd_baseline), 5)
        assert not fds, f"the daemon holds {fds} more fds than before the example"

    def _clean_up(self) -> None:
        for sock in self.socks:
            if sock.ws.left is None:
                sock.ws.reset()
        if self.findings:  # leave nothing running for the next example
            for session in self.sessions:
                try:
                    killer = ModelSocket(self.daemon.address, "cleanup")
                    reconnect = {"type": "reconnect", "command_id": session.command_id}
                    killer.send(reconnect, {"type": "kill"})
                    killer.wait_for(lambda ws: ws.finished, 10)
                    killer.reset()
                except (OSError, AssertionError):
                    pass


def expectation(session: SessionModel) -> Attach:
    """What a binding frame sent now must get (see ``Attach``)."""
    now, ttl = time.monotonic(), session.ttl
    if ttl >= LONG_TTL:
        return Attach.ATTACHED
    if session.ended_seen is None:
        if ttl == 0:
            return Attach.EITHER
        return Attach.ATTACHED if now < session.spawned_at + ttl - 1 else Attach.EITHER
    if ttl == 0 or now > session.ended_seen + ttl + 1:
        return Attach.EXPIRED
    return Attach.ATTACHED if now < session.spawned_at + ttl - 1 else Attach.EITHER
