"""Logging as one JSON object per line on stderr.

Every record carries ``ts`` (RFC 3339, UTC), ``level``, ``logger`` and ``msg``; fields passed
with ``extra={...}`` are added as they are, and an exception as ``exc``.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_encoder = msgspec.json.Encoder(enc_hook=repr)  # anything unusual: its repr


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


def setup_logging(level: str) -> None:
    """Send every log record to stderr as JSON, at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
