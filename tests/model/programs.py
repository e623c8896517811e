"""The deterministic commands the model runs, and what each prints.

* ECHO reads stdin line by line and prints ``<n> <line>`` on stdout and ``err <n>`` on
  stderr for the n-th line (after a line ending in ``?``, under a PTY, also ``stty size``);
  at EOF ``eof <n>``, then it exits with its code. Under a PTY it first turns the
  terminal's echo off and prints ``ready``: input is sent only after that.
* STREAM prints a seeded stream of lines on stdout, every second line also on stderr
  (stdout only under a PTY), and exits with its code without reading stdin.
* SINK prints ``sink`` and sleeps, never reading stdin: input piles up in front of it.
  It ends only when killed or signalled.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    """Which program a session runs."""

    ECHO = "echo"
    STREAM = "stream"
    SINK = "sink"


#: The signals the model sends (none of them is caught by the programs). INT is left
#: out: bash gives SIGINT special treatment while it waits for a child.
SIGNALS: dict[str | int, int] = {
    "TERM": signal.SIGTERM,
    "SIGTERM": signal.SIGTERM,
    15: signal.SIGTERM,
    "HUP": signal.SIGHUP,
    "usr1": signal.SIGUSR1,
    int(signal.SIGUSR1): signal.SIGUSR1,
}


@dataclass(frozen=True)
class Program:
    """One command's program and its parameters."""

    kind: Kind
    pty: bool
    code: int = 0
    seed: int = 0
    lines: int = 0

    @property
    def ready(self) -> str | None:
        """Text the program prints once it is ready for input (PTY only)."""
        if not self.pty or self.kind is Kind.STREAM:
            return None
        return "ready\r\n" if self.kind is Kind.ECHO else "sink\r\n"

    def script(self) -> str:
        """The ``bash -c`` text."""
        if self.kind is Kind.ECHO:
            setup = "stty -echo; printf 'ready\\n'; " if self.pty else ""
            return (
                f"{setup}n=0; while IFS= read -r l; do n=$((n+1)); "
                'printf \'%d %s\\n\' "$n" "$l"; '
                "case $l in *'?') stty size;; esac; "
                "printf 'err %d\\n' \"$n\" >&2; done; "
                f"printf 'eof %d\\n' \"$n\"; exit {self.code}"
            )
        if self.kind is Kind.SINK:
            setup = "stty -echo; " if self.pty else ""
            return f"{setup}printf 'sink\\n'; exec sleep 1000"
        err = (
            ""
            if self.pty
            else ' if (i % 2 == 0) print "e" s+i " ü-" (i % 97) "-z" > "/dev/stderr";'
        )
        return (
            f"exec awk 'BEGIN {{ s = {self.seed}; for (i = 0; i < {self.lines}; i++) "
            f'{{ print "o" s+i " é" (i % 89);{err} }} exit {self.code} }}\''
        )

    def stream_output(self) -> tuple[bytes, bytes]:
        """STREAM: the whole stdout and stderr of a run to its end."""
        assert self.kind is Kind.STREAM
        nl = "\r\n" if self.pty else "\n"
        out = "".join(f"o{self.seed + i} é{i % 89}{nl}" for i in range(self.lines))
        err = ""
        if not self.pty:
            err = "".join(f"e{self.seed + i} ü-{i % 97}-z\n" for i in range(0, self.lines, 2))
        return out.encode(), err.encode()

    def sink_output(self) -> bytes:
        """SINK: its whole stdout."""
        return b"sink\r\n" if self.pty else b"sink\n"


def signal_name(signo: int) -> str:
    """``15`` -> ``"TERM"``, as the ``exit`` frame names it."""
    return signal.Signals(signo).name.removeprefix("SIG")
