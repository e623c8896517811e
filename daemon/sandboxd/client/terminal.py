"""The local terminal: raw mode that is always undone, the window size, detach keys.

``RawTerminal`` saves the settings of a terminal stdin, enters raw mode, and restores
them (``TCSADRAIN``) on every way out: its ``restore`` runs from ``finally``, from
``atexit`` and from the CLI's SIGTERM/SIGHUP handling, and is idempotent. After an
abnormal end it also writes ``RESET_SEQUENCES``, for a remote program that left the
alternate screen, a hidden cursor or mouse reporting on.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import termios
import tty
from typing import Any

#: Leave the alternate screen, show the cursor, mouse and bracketed paste off, keypad off.
RESET_SEQUENCES = (
    b"\x1b[?1049l\x1b[?25h\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?2004l\x1b>"
)
DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"


def window_size(fd: int = 0) -> tuple[int, int] | None:
    """(cols, rows) of the terminal on ``fd`` (or stdout's), None if neither is one."""
    for candidate in (fd, 1):
        try:
            size = os.get_terminal_size(candidate)
        except OSError:
            continue
        if size.columns > 0 and size.lines > 0:
            return size.columns, size.lines
    return None


class RawTerminal:
    """Raw mode on ``fd`` for the life of a ``with`` block (nothing if it is no tty)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            atexit.register(self.restore)
            tty.setraw(self.fd, termios.TCSADRAIN)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    @property
    def active(self) -> bool:
        return self._saved is not None

    def restore(self, reset: bool = False) -> None:
        """Put the saved settings back (once); ``reset`` also undoes remote screen modes."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        if reset:
            with contextlib.suppress(OSError):
                os.write(1, RESET_SEQUENCES)
        with contextlib.suppress(termios.error):
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        atexit.unregister(self.restore)


def parse_detach_keys(spec: str) -> bytes:
    """docker's syntax: ``ctrl-p,ctrl-q``, single characters, ``ctrl-@`` .. ``ctrl-_``.

    An empty spec disables detaching. Raises ``ValueError`` for a key it cannot read.
    """
    keys = bytearray()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lowered = part.lower()
        if lowered.startswith("ctrl-") and len(part) == 6:
            char = lowered[5]
            if "a" <= char <= "z":
                keys.append(ord(char) - ord("a") + 1)
            elif char in "@[\\]^_":
                keys.append(ord(char.upper()) - 64 if char != "@" else 0)
            else:
                raise ValueError(f"unknown detach key {part!r}")
        elif len(part) == 1:
            keys.append(ord(part))
        else:
            raise ValueError(f"unknown detach key {part!r}")
    return bytes(keys)


class DetachMatcher:
    """Finds the detach sequence in typed input. Bytes that could start it are held
    back until the sequence completes (detach) or breaks (they are sent after all)."""

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self._held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(bytes to send now, whether the user detached)."""
        if not self.keys:
            return data, False
        out = bytearray()
        for byte in data:
            candidate = self._held + bytes([byte])
            if not self.keys.startswith(candidate):
                out += self._held  # the sequence broke: what was held goes out ...
                candidate = bytes([byte])  # ... and this byte may start it afresh
                if not self.keys.startswith(candidate):
                    out += candidate
                    self._held = b""
                    continue
            if candidate == self.keys:
                self._held = b""
                return bytes(out), True
            self._held = candidate
        return bytes(out), False


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to ``fd``, waiting out a non-blocking fd that is full."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [])
            continue
        view = view[written:]


def say(message: str) -> None:
    """One line for the user on stderr (CRLF-safe in raw mode)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
