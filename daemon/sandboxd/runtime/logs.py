"""Logging as one JSON object per line on stderr.

Every record carries ``ts`` (RFC 3339, UTC), ``level``, ``logger`` and ``msg``; fields passed
with ``extra={...}`` are added as they are, and an exception as ``exc``.

Logging is on every command's path (``command started``, ``command finished``), so it is
kept cheap: records skip the caller lookup and the thread and process fields (the JSON
shows none of them), and lines logged on the event loop's thread are held until the loop
is about to sleep, or for at most ``HOLD_SECONDS`` while it stays busy
(``FlushBeforeWait``), then written together: a busy daemon makes one write for many
lines, not one per line. Lines from other threads, and all lines when no loop runs, are
written at once; ``logging.shutdown`` (at exit) writes what is held.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

import msgspec
import trio

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_encoder = msgspec.json.Encoder(enc_hook=repr)  # anything unusual: its repr
#: How long a busy loop holds its lines at most.
HOLD_SECONDS = 0.05


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, object] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode("utf-8", "replace")


class JsonLineHandler(logging.StreamHandler[TextIO]):
    """Writes formatted lines to ``stream``; while ``hold_on`` names a thread, that
    thread's lines wait for ``write_held``."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.hold_on: int | None = None
        self._held: list[str] = []
        self.held_since = 0.0  # time.monotonic() of the oldest held line

    def emit(self, record: logging.LogRecord) -> None:
        if self.hold_on is None or threading.get_ident() != self.hold_on:
            super().emit(record)
            return
        try:
            if not self._held:
                self.held_since = time.monotonic()
            self._held.append(self.format(record))
        except Exception:
            self.handleError(record)

    def write_held(self) -> None:
        """Write the held lines, in the order they were logged."""
        if not self._held:
            return
        lines, self._held = self._held, []
        lines.append("")
        with self.lock or _NO_LOCK:
            try:
                self.stream.write("\n".join(lines))
                self.stream.flush()
            except Exception:  # as StreamHandler.emit: a broken stderr loses lines only
                if logging.raiseExceptions:
                    sys.stderr.write("sandboxd: cannot write log lines\n")

    def flush(self) -> None:
        self.write_held()
        super().flush()


_NO_LOCK = threading.Lock()


class FlushBeforeWait(trio.abc.Instrument):
    """A trio instrument: holds the loop thread's log lines while the loop runs tasks,
    and writes them when it is about to sleep (to wait for I/O with a timeout), when it
    has held them for ``HOLD_SECONDS``, and when the run ends."""

    def __init__(self, handler: JsonLineHandler) -> None:
        self._handler = handler

    def before_run(self) -> None:
        self._handler.hold_on = threading.get_ident()

    def before_io_wait(self, timeout: float) -> None:
        handler = self._handler
        if timeout > 0 or time.monotonic() - handler.held_since >= HOLD_SECONDS:
            handler.write_held()

    def after_run(self) -> None:
        self._handler.hold_on = None
        self._handler.write_held()


def setup_logging(level: str) -> JsonLineHandler:
    """Send every log record to stderr as JSON, at ``level`` and above; the handler is
    returned for ``FlushBeforeWait``."""
    logging._srcfile = None  # no stack walk per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = JsonLineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
