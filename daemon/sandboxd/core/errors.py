"""The one exception hierarchy of sandboxd.

Each error knows how it is reported at the edge: the ``error_type`` string of a
WebSocket ``error`` frame or of an HTTP ``{"detail": {"error", "message"}}`` body, and
the HTTP status used when it is answered over plain HTTP. Code raises these inside the
daemon; only the server translates them to the wire (as httpx does with its own).

    SandboxdError                  (CommandError, 500)
    ├── InvalidRequest             (InvalidRequest, 400): malformed or contradictory input
    ├── CommandNotFound            (CommandNotFound, 404): no session with that id
    ├── SessionExpired             (SessionExpired, 410): the session's TTL ran out
    ├── SpawnFailed                (CommandError, 500): shell, work dir or user unusable
    ├── CommandTimeout             (CommandTimeout, 408): reported instead of ``exit``
    ├── TooManySessions            (TooManySessions, 503): the session cap is reached
    ├── ServerShuttingDown         (ServerShuttingDown, 503): the daemon is stopping
    ├── NotFound                   (NotFound, 404): no such endpoint
    ├── MethodNotAllowed           (MethodNotAllowed, 405)
    ├── PayloadTooLarge            (PayloadTooLarge, 413): a body over its limit
    ├── FileNotFound               (FileNotFound, 404): the path does not exist
    ├── PermissionDenied           (PermissionDenied, 403): the filesystem refused
    ├── ReadError                  (ReadError, 500): reading a file failed otherwise
    └── WriteError                 (WriteError, 500): writing a file failed otherwise
"""

from __future__ import annotations


class SandboxdError(Exception):
    """Base of every error sandboxd reports to a client."""

    error_type: str = "CommandError"
    http_status: int = 500

    @property
    def message(self) -> str:
        """The human-readable text sent with the error."""
        return str(self.args[0]) if self.args else self.error_type


class InvalidRequest(SandboxdError):
    """A request that is malformed, of the wrong type, or contradicts itself."""

    error_type = "InvalidRequest"
    http_status = 400


class CommandNotFound(SandboxdError):
    """No session is known under the requested ``command_id``."""

    error_type = "CommandNotFound"
    http_status = 404


class SessionExpired(SandboxdError):
    """The session existed, but its TTL after exit has run out."""

    error_type = "SessionExpired"
    http_status = 410


class SpawnFailed(SandboxdError):
    """The command could not be started (missing shell, work dir, or user)."""

    error_type = "CommandError"
    http_status = 500


class CommandTimeout(SandboxdError):
    """The command ran longer than its ``timeout_seconds`` and was killed."""

    error_type = "CommandTimeout"
    http_status = 408


class TooManySessions(SandboxdError):
    """The configured cap on live sessions is reached."""

    error_type = "TooManySessions"
    http_status = 503


class ServerShuttingDown(SandboxdError):
    """The daemon is stopping and accepts no new work."""

    error_type = "ServerShuttingDown"
    http_status = 503


class NotFound(SandboxdError):
    """No endpoint at that path."""

    error_type = "NotFound"
    http_status = 404


class MethodNotAllowed(SandboxdError):
    """The endpoint exists, but not for that method."""

    error_type = "MethodNotAllowed"
    http_status = 405


class PayloadTooLarge(SandboxdError):
    """A request body over its limit."""

    error_type = "PayloadTooLarge"
    http_status = 413


class FileNotFound(SandboxdError):
    """The requested file or directory does not exist."""

    error_type = "FileNotFound"
    http_status = 404


class PermissionDenied(SandboxdError):
    """The filesystem refused the daemon access."""

    error_type = "PermissionDenied"
    http_status = 403


class ReadError(SandboxdError):
    """Reading a file failed (it is a directory, an I/O error, ...)."""

    error_type = "ReadError"
    http_status = 500


class WriteError(SandboxdError):
    """Writing a file failed (no space, a directory in the way, ...)."""

    error_type = "WriteError"
    http_status = 500
