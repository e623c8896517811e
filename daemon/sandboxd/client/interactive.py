"""Following one command in the foreground: ``exec``, ``shell`` and ``attach``.

One thread, one ``selectors`` loop over the WebSocket, stdin and a signal wake-up fd:

* output is written to fd 1 / fd 2 as it arrives, and the offsets move only past what
  was written, so a reattach after a network cut loses and repeats nothing;
* with a terminal (``-t`` and a tty stdin) the terminal is raw, typed bytes go to the
  command as ``input``, the detach keys detach, and SIGWINCH sends ``resize``;
* without one, Ctrl-C sends SIGINT to the command and a second one within
  ``INTERRUPT_WINDOW`` seconds kills it (exit 130); stdin is streamed when ``-i`` asks,
  then half-closed at its EOF;
* SIGTERM and SIGHUP detach (the command keeps running), exiting 128+N.

``follow`` returns the exit status for the CLI.
"""

from __future__ import annotations

import codecs
import os
import selectors
import signal
import socket
import time
from typing import Any

from sandboxd.client.connection import CommandStream, error_message
from sandboxd.client.terminal import DetachMatcher, RawTerminal, say, window_size, write_all
from sandboxd.client.websocket import Closed

INTERRUPT_WINDOW = 2.0
EXIT_TIMEOUT, EXIT_INTERRUPTED = 124, 130
_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP)


class Mode:
    """How the foreground follows its command: ``stdin`` forwarded as input; ``tty``: a
    raw local terminal and a remote PTY; ``read_only``: watching, Ctrl-C detaches."""

    def __init__(
        self,
        stdin: bool = False,
        tty: bool = False,
        detach_keys: bytes = b"",
        read_only: bool = False,
    ) -> None:
        self.stdin = stdin
        self.tty = tty
        self.detach_keys = detach_keys
        self.read_only = read_only


class _Detached(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class Follower:
    """The loop of one foreground command (see the module docstring)."""

    def __init__(self, stream: CommandStream, mode: Mode) -> None:
        self.stream = stream
        self.mode = mode
        self.terminal = RawTerminal(0)
        self.selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._interrupted_at: float | None = None
        self._killed_by_user = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._matcher = DetachMatcher(mode.detach_keys if mode.tty else b"")
        self._stdin_open = mode.stdin
        self._stdin_registered = False

    def run(self) -> int:
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous = {signo: signal.getsignal(signo) for signo in _SIGNALS}
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        for signo in _SIGNALS:
            signal.signal(signo, self._on_signal)
        self.selector.register(wake_read, selectors.EVENT_READ, "signal")
        try:
            if self.mode.tty:
                self.terminal.__enter__()
            try:
                return self._loop(wake_read)
            except _Detached as detached:
                self.terminal.restore()
                say(
                    f"detached from {self.stream.command_id} (still running); resume: "
                    f"{self.stream.offsets.hint(self.stream.command_id)}"
                )
                return detached.code
            except BaseException:
                self.terminal.restore(reset=True)
                raise
        finally:
            self.terminal.restore()
            signal.set_wakeup_fd(old_wakeup)
            for signo, handler in previous.items():
                signal.signal(signo, handler)
            self.selector.close()
            wake_read.close()
            wake_write.close()
            if self.stream.ws is not None:
                self.stream.ws.close()

    def _on_signal(self, signo: int, frame: object) -> None:
        self._signals.append(signo)

    # ---- the loop ---------------------------------------------------------------------

    def _loop(self, wake: socket.socket) -> int:
        ws = self.stream.open()
        self.selector.register(ws.sock, selectors.EVENT_READ, "ws")
        while True:
            assert self.stream.ws is not None
            code = self._handle(self.stream.ws.buffered())
            if code is not None:
                return code
            for key, _ in self.selector.select():
                if key.data == "signal":
                    self._drain(wake)
                    self._apply_signals()
                elif key.data == "stdin":
                    self._read_stdin()
                else:
                    try:
                        messages = self.stream.ws.receive()
                    except Closed:
                        self._reattach()
                        break
                    code = self._handle(messages)
                    if code is not None:
                        return code

    def _reattach(self) -> None:
        assert self.stream.ws is not None
        self.selector.unregister(self.stream.ws.sock)

        def wait(seconds: float) -> bool:
            # Sleep, but an interrupt (or a SIGTERM/SIGHUP) ends the waiting at once.
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                for key, _ in self.selector.select(left):
                    if key.data == "signal":
                        self._drain(key.fileobj)  # type: ignore[arg-type]
                        if any(s != signal.SIGWINCH for s in self._signals):
                            return False
                        self._signals.clear()
                    elif key.data == "stdin":
                        self.selector.unregister(0)  # left unread until reattached:
                        self._stdin_registered = False  # the next started resumes it
            return True

        self.stream.reopen(wait)
        assert self.stream.ws is not None
        self.selector.register(self.stream.ws.sock, selectors.EVENT_READ, "ws")

    @staticmethod
    def _drain(wake: socket.socket) -> None:
        try:
            while wake.recv(512):
                pass
        except BlockingIOError:
            pass

    def _handle(self, messages: list[str | bytes]) -> int | None:
        for frame in self.stream.frames(messages):
            kind = frame.get("type")
            if kind == "stdout":
                write_all(1, frame["bytes"])
            elif kind == "stderr":
                write_all(2, frame["bytes"])
            elif kind == "started":
                self._on_started()
            elif kind == "gap":
                lost = int(frame.get("to", 0)) - int(frame.get("from", 0))
                self._note(f"[sandboxd: {lost} bytes of {frame.get('stream')} were dropped]")
            elif kind == "exit":
                return EXIT_INTERRUPTED if self._killed_by_user else int(frame["exit_code"])
            elif kind == "error":
                return self._on_error(frame)
        return None

    def _on_started(self) -> None:
        # Input is read only once the command is bound: a frame sent earlier could be
        # applied out of order by the daemon (held frames vs. frames racing the bind).
        if self._stdin_open and not self._stdin_registered:
            self.selector.register(0, selectors.EVENT_READ, "stdin")
            self._stdin_registered = True
        if self.mode.tty and not self.mode.read_only and self.stream.execute is None:
            self._send_window_size()  # an attach: make the program redraw at our size

    def _on_error(self, frame: dict[str, Any]) -> int | None:
        if frame.get("error_type") == "CommandTimeout":
            self.terminal.restore()
            say(f"sandboxd: {frame.get('error', 'the command timed out')}")
            return EXIT_TIMEOUT
        if str(frame.get("error", "")).startswith("read-only attachment"):
            self._note(f"sandboxd: {frame['error']}")
            return None
        raise error_message(frame, self.stream.command_id)

    def _note(self, message: str) -> None:
        write_all(2, (message + ("\r\n" if self.terminal.active else "\n")).encode())

    def _send_window_size(self) -> None:
        size = window_size(0)
        if size is not None:
            self.stream.send(type="resize", cols=size[0], rows=size[1])

    # ---- input and signals ----------------------------------------------------------

    def _read_stdin(self) -> None:
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(0)
            self._stdin_open = False
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self.stream.send(type="input", data=tail)
            if not self.mode.tty:
                self.stream.send(type="close_stdin")
            return
        detached = False
        if self.mode.tty:
            data, detached = self._matcher.feed(data)
        text = self._decoder.decode(data)
        if text:
            self.stream.send(type="input", data=text)
        if detached:
            raise _Detached(0)

    def _apply_signals(self) -> None:
        pending, self._signals = self._signals, []
        for signo in pending:
            if signo == signal.SIGWINCH:
                if self.mode.tty and not self.mode.read_only:
                    self._send_window_size()
            elif signo in (signal.SIGTERM, signal.SIGHUP):
                raise _Detached(128 + signo)
            elif self.mode.read_only:
                raise _Detached(0)
            elif signo == signal.SIGQUIT:
                self.stream.send(type="signal", signal="QUIT")
            else:
                self._interrupt()

    def _interrupt(self) -> None:
        now = time.monotonic()
        if self._interrupted_at is not None and now - self._interrupted_at <= INTERRUPT_WINDOW:
            self._killed_by_user = True
            self.stream.send(type="kill")
        else:
            self._interrupted_at = now
            self.stream.send(type="signal", signal="INT")


def follow(stream: CommandStream, mode: Mode) -> int:
    """Follow ``stream`` in the foreground; the CLI's exit status (raises ``CliError``)."""
    return Follower(stream, mode).run()
