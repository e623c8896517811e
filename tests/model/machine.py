"""The state machine: its rules are what clients of ``/execute/ws`` may do, in any order.

Every example starts one command of each program (ECHO, STREAM, SINK) with random
options; rules then start more, attach more sockets, send frames and drop sockets. The
model (``state.py``) records what each socket sent and checks every frame as it arrives
(the invariant, after every step); at the end ``Driver.end_example`` ends every command
and runs the final checks (``checks.py``).

A rule names its socket by ``pick``, an index into the open sockets that fit the rule
(chosen from what the model did, never from timing, so that a replay draws the same).
A finding does not end the example at once: it is raised at the end (see ``step``).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.model.client import Mode
from tests.model.driver import LONG_TTL, Driver
from tests.model.programs import SIGNALS, Kind, Program
from tests.model.state import Sent, SessionModel, SocketModel

#: Every command id and TTL the model used, for the module's last test.
USED: list[tuple[str, int]] = []
_ids = itertools.count()

F = TypeVar("F", bound=Callable[..., Any])


def step(fn: F) -> F:
    """Record what a rule or invariant found wrong instead of raising it at once: the
    example goes on to its end, where the first finding is raised. (A timing-dependent
    finding would otherwise end the example at a different step in each replay, and
    hypothesis could not shrink it.) After a finding, steps do nothing."""

    @functools.wraps(fn)
    def wrapper(self: ExecModel, *args: Any, **kwargs: Any) -> Any:
        if self.findings:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:
            self.findings.append((fn.__name__, exc))
            return None

    return wrapper  # type: ignore[return-value]


picks = st.integers(0, 15)
floods = st.sampled_from(["kill", "signal", "resize", "close_stdin", None])
#: Input can be pipelined only without a PTY (see ``Program``): more of those.
ptys = st.sampled_from([False, False, True])
modes = st.sampled_from(list(Mode))
pads = st.sampled_from([0, 0, 5, 200])
ttls = st.sampled_from([0, 2, LONG_TTL])
codes = st.integers(0, 5)
stream_programs = st.builds(
    Program, st.just(Kind.STREAM), st.booleans(), codes, st.integers(0, 10**6),
    st.sampled_from([10, 3000, 24000, 24000]),
)  # fmt: skip
programs = st.one_of(
    st.builds(Program, st.just(Kind.ECHO), ptys, codes),
    stream_programs,
    st.builds(Program, st.just(Kind.SINK), st.booleans()),
)
start_options: dict[str, st.SearchStrategy[Any]] = {
    "ttl": ttls,
    "close_stdin": st.booleans(),
    "early": st.integers(0, 2),
    "early_close": st.booleans(),
    "pipelined": st.integers(0, 8),
    "trickle": st.booleans(),
    "pad": pads,
    "mode": modes,
    "then": st.sampled_from([None, None, "close_stdin", "kill"]),
}


class ExecModel(Driver, RuleBasedStateMachine):
    """Random interleavings of what clients of ``/execute/ws`` may do."""

    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        Driver.__init__(self)

    def _pick(
        self, pick: int, fits: Callable[[SocketModel], bool] = lambda s: True
    ) -> SocketModel | None:
        open_ = [s for s in self.socks if s.role != "auditor" and s.ws.left is None and fits(s)]
        return open_[pick % len(open_)] if open_ else None

    # ---- starting commands ------------------------------------------------------------

    def _start(
        self, program: Program, ttl: int, close_stdin: bool, early: int, early_close: bool,
        pipelined: int, trickle: bool, pad: int, mode: Mode, then: str | None,
    ) -> SocketModel:  # fmt: skip
        """``execute``, with input and close_stdin frames before it (held until it binds)
        and input frames right behind it, then maybe ``close_stdin`` or ``kill``."""
        command_id = f"model-{os.getpid()}-{next(_ids)}"
        USED.append((command_id, ttl))
        pipe_closed = close_stdin and not program.pty
        session = SessionModel(command_id, program, ttl, pipe_closed, time.monotonic())
        self.sessions.append(session)
        sock = self.open_socket(session, "execute", (0, 0))
        sock.set_mode(mode)
        frames: list[dict[str, Any]] = []
        if not program.pty:  # a PTY echoes input until the program turns that off
            frames += self.lines(sock, early, pad)
            if early_close:
                sock.sent.append(Sent("close"))
                frames.append({"type": "close_stdin"})
        frames.append(
            {
                "type": "execute",
                "command": program.script(),
                "command_id": command_id,
                "close_stdin": close_stdin,
                "pty": program.pty,
                "ttl_seconds": ttl,
                "timeout_seconds": 0,
                "idle_timeout_seconds": -1,
            }
        )
        behind = self.lines(sock, pipelined, pad) if not program.pty else []
        if then == "close_stdin" and not program.pty:
            sock.sent.append(Sent("close"))
            behind.append({"type": "close_stdin"})
        elif then == "kill":
            session.kills += 1
            behind.append({"type": "kill"})
        self.send_behind(sock, frames, behind, trickle)
        if then == "kill":
            self.ends_soon(session, f"kill right behind execute on {sock.name}")
        return sock

    @initialize(**{"pty": ptys, "code": codes, **start_options})
    @step
    def start_echo(self, pty: bool, code: int, **options: Any) -> None:
        self._start(Program(Kind.ECHO, pty, code), **options)

    @initialize(**{"program": stream_programs, **start_options})
    @step
    def start_stream(self, program: Program, **options: Any) -> None:
        self._start(program, **options)

    @initialize(**{"pty": st.booleans(), "flood": floods, **start_options})
    @step
    def start_sink(self, pty: bool, flood: str | None, **options: Any) -> None:
        sock = self._start(Program(Kind.SINK, pty), **options)
        if flood is not None:
            sock.ws.wait_for(lambda ws: len(ws.frames()) >= 2 or ws.mode is Mode.PAUSED, 5)
            self._flood(sock, flood)

    @precondition(lambda self: len(self.sessions) < 5)
    @rule(**{"program": programs, **start_options})
    @step
    def execute(self, program: Program, **options: Any) -> None:
        self._start(program, **options)

    # ---- more sockets -----------------------------------------------------------------

    @precondition(lambda self: len(self.socks) < 12)
    @rule(
        pick=picks,
        how=st.sampled_from(["reconnect-0", "reconnect-here", "execute-again"]),
        close_first=st.booleans(),
        pipelined=st.integers(0, 3),
        trickle=st.booleans(),
        mode=modes,
    )
    @step
    def attach(
        self, pick: int, how: str, close_first: bool, pipelined: int, trickle: bool, mode: Mode
    ) -> None:
        """A second socket on the same command: ``reconnect`` at 0 or at another socket's
        offsets, or the same ``execute`` again (get-or-create), with frames around it."""
        other = self._pick(pick)
        if other is None:
            return
        session = other.session
        if how == "execute-again" and session.ttl < LONG_TTL:
            how = "reconnect-0"  # a repeated execute after the TTL would start a new command
        offsets = other.ws.offsets() if how == "reconnect-here" else (0, 0)
        role = "execute-again" if how == "execute-again" else "reconnect"
        sock = self.open_socket(session, role, offsets)
        sock.set_mode(mode)
        self.bind(sock, close_first, pipelined, trickle)

    @rule(pick=picks, reset=st.booleans())
    @step
    def drop(self, pick: int, reset: bool) -> None:
        """A socket leaves: a clean close, or a TCP reset."""
        sock = self._pick(pick)
        if sock is None:
            return
        sock.session.unprotect()
        if reset:
            sock.ws.reset()
        else:
            sock.ws.close_clean()

    @precondition(lambda self: len(self.socks) < 12)
    @rule(
        pick=picks, close_first=st.booleans(), pipelined=st.integers(0, 3), trickle=st.booleans(),
        mode=modes,
    )  # fmt: skip
    @step
    def reconnect(
        self, pick: int, close_first: bool, pipelined: int, trickle: bool, mode: Mode
    ) -> None:
        """A new socket resumes where a dropped one left off (as an SDK does)."""
        gone = [s for s in self.socks if s.ws.left is not None and s.role != "auditor"]
        if not gone:
            return
        old = gone[pick % len(gone)]
        sock = self.open_socket(old.session, "reconnect", old.ws.offsets())
        sock.set_mode(mode)
        self.bind(sock, close_first, pipelined, trickle)

    @rule(pick=picks, mode=modes)
    @step
    def reader(self, pick: int, mode: Mode) -> None:
        """A socket reads fast, slowly, or not at all from now on."""
        sock = self._pick(pick)
        if sock is not None:
            sock.set_mode(mode)

    # ---- frames -----------------------------------------------------------------------

    @rule(pick=picks, count=st.integers(1, 5), pad=pads, trickle=st.booleans(), query=st.booleans())
    @step
    def send_input(self, pick: int, count: int, pad: int, trickle: bool, query: bool) -> None:
        """``input`` frames for ECHO, in one write or one by one."""
        sock = self._pick(pick, lambda s: s.session.program.kind is Kind.ECHO)
        if sock is None:
            return
        sock.session.audit()
        if not sock.session.ready():
            return
        frames = self.lines(sock, count, pad, query and sock.session.program.pty)
        self.send_behind(sock, [], frames, trickle)

    @rule(pick=picks)
    @step
    def input_comes_back(self, pick: int) -> None:
        """A line reaches ECHO and comes back while stdin is open."""
        sock = self._pick(pick, lambda s: s.session.program.kind is Kind.ECHO)
        if sock is not None:
            self.round_trip(sock)

    @rule(pick=picks, eot=st.booleans())
    @step
    def close_stdin(self, pick: int, eot: bool) -> None:
        """``close_stdin`` (a no-op under a PTY), or under a PTY the EOT character."""
        sock = self._pick(pick)
        if sock is None:
            return
        session = sock.session
        session.audit()
        if not session.program.pty:
            sock.sent.append(Sent("close"))
            sock.ws.send({"type": "close_stdin"})
        elif eot and session.ready():
            sock.sent.append(Sent("close"))
            sock.ws.send({"type": "input", "data": "\x04"})
        else:
            sock.ws.send({"type": "close_stdin"})

    @rule(pick=picks, name=st.sampled_from(list(SIGNALS)))
    @step
    def signal(self, pick: int, name: str | int) -> None:
        """``signal``: the command ends within a second."""
        sock = self._pick(pick)
        if sock is None:
            return
        sock.session.signals.append(SIGNALS[name])
        sock.ws.send({"type": "signal", "signal": name})
        self.ends_soon(sock.session, f"signal {name!r} sent on {sock.name}")

    @rule(pick=picks)
    @step
    def kill(self, pick: int) -> None:
        """``kill``: the command ends within a second."""
        sock = self._pick(pick)
        if sock is None:
            return
        sock.session.kills += 1
        sock.ws.send({"type": "kill"})
        self.ends_soon(sock.session, f"kill sent on {sock.name}")

    @rule(pick=picks, cols=st.integers(1, 300), rows=st.integers(1, 100))
    @step
    def resize(self, pick: int, cols: int, rows: int) -> None:
        """``resize`` (changes nothing without a PTY)."""
        sock = self._pick(pick)
        if sock is not None:
            sock.sent.append(Sent("resize", size=(rows, cols)))
            sock.ws.send({"type": "resize", "cols": cols, "rows": rows})

    @rule(pick=picks, then=floods)
    @step
    def flood_stdin(self, pick: int, then: str | None) -> None:
        """1.5 MiB of input for SINK, which never reads it, then maybe a control frame on
        the same socket: that frame must not wait behind the input."""
        sock = self._pick(pick, lambda s: s.session.program.kind is Kind.SINK)
        if sock is not None:
            self._flood(sock, then)

    def _flood(self, sock: SocketModel, then: str | None) -> None:
        session = sock.session
        session.audit()
        if not session.ready() or session.ended():
            return
        block = ("y" * 1023 + "\n") * 128
        frames: list[dict[str, Any]] = [{"type": "input", "data": block} for _ in range(12)]
        if then == "kill":
            session.kills += 1
            frames.append({"type": "kill"})
        elif then == "signal":
            session.signals.append(SIGNALS["TERM"])
            frames.append({"type": "signal", "signal": "TERM"})
        elif then == "resize":
            sock.sent.append(Sent("resize", size=(40, 100)))
            frames.append({"type": "resize", "cols": 100, "rows": 40})
        elif then == "close_stdin":
            frames.append({"type": "close_stdin"})
        sock.ws.send(*frames)
        if then in ("kill", "signal"):
            self.ends_soon(session, f"{then} behind 1.5 MiB of input on {sock.name}")

    @rule(seconds=st.sampled_from([0.05, 0.5, 2.5]))
    @step
    def idle(self, seconds: float) -> None:
        """Nobody does anything for a while (readers keep reading)."""
        time.sleep(seconds)

    @invariant()
    @step
    def every_frame_so_far_is_right(self) -> None:
        for session in self.sessions:
            session.audit()

    def teardown(self) -> None:
        self.end_example()
