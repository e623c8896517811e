"""The daemon's settings: one frozen struct, built from flags and ``SANDBOXD_*`` variables.

Every field carries its own help text (``msgspec.Meta(description=...)``), so the
command-line parser in ``cli.py`` is generated from this struct and cannot drift from it.
The environment twin of ``ring_bytes`` is ``SANDBOXD_RING_BYTES``, its flag ``--ring-bytes``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Largest amount of UTF-8 output carried by one ``stdout``/``stderr`` frame. JSON
#: escaping can grow it at most 6x, which keeps every frame far below the 1 MiB the
#: Python client accepts.
CHUNK_BYTES = 64 * KiB


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything that can be set when sandboxd starts."""

    listen: Annotated[str, _doc("HOST:PORT to listen on (port 0 picks a free one)")] = (
        "127.0.0.1:8080"
    )
    log_level: Annotated[str, _doc("debug, info, warning or error")] = "info"
    ring_bytes: Annotated[
        int, msgspec.Meta(ge=CHUNK_BYTES), _doc("output kept per stream of each command, bytes")
    ] = 16 * MiB
    buffer_cap_bytes: Annotated[
        int,
        msgspec.Meta(ge=CHUNK_BYTES),
        _doc(
            "output kept across all commands, bytes; past it the oldest output of "
            "finished commands goes first, then that of the largest running stream"
        ),
    ] = 512 * MiB
    max_sessions: Annotated[
        int, msgspec.Meta(ge=1), _doc("sessions (running or within their TTL) at once")
    ] = 20_000
    drain_seconds: Annotated[
        float,
        msgspec.Meta(ge=0),
        _doc("after a command exits, how long to wait for output still held by its children"),
    ] = 1.0
    stall_seconds: Annotated[
        float,
        msgspec.Meta(gt=0),
        _doc(
            "a client that takes no output for this long stops pacing its command (it "
            "may later see a gap instead of holding the command and others back); a "
            "client that left keeps pacing this long, so a quick reconnect loses nothing"
        ),
    ] = 5.0
    pty_cols: Annotated[int, msgspec.Meta(ge=1, le=65535), _doc("PTY width at start")] = 80
    pty_rows: Annotated[int, msgspec.Meta(ge=1, le=65535), _doc("PTY height at start")] = 24
    term: Annotated[str, _doc("TERM given to PTY commands")] = "xterm-256color"
    home: Annotated[
        str, _doc("default work dir and HOME of commands (/ when it does not exist)")
    ] = "/home/user"
    stop_grace: Annotated[
        float,
        msgspec.Meta(ge=0),
        _doc("on shutdown, seconds between SIGTERM and SIGKILL to running commands"),
    ] = 10.0
    ws_max_message_bytes: Annotated[
        int, msgspec.Meta(ge=KiB), _doc("largest WebSocket message accepted from a client")
    ] = 8 * MiB
    sse_ack_bytes: Annotated[
        int,
        msgspec.Meta(ge=CHUNK_BYTES),
        _doc("output one SSE response carries before it asks the client to resume"),
    ] = 8 * MiB
    search_deadline_seconds: Annotated[
        float, msgspec.Meta(gt=0), _doc("time limit of one /glob or /grep walk")
    ] = 10.0
    tunnel_ports: Annotated[
        str,
        _doc("ports /tunnel may reach, e.g. '22,8000-9000'; empty: all but sandboxd's own"),
    ] = ""
    token: Annotated[
        str,
        _doc(
            "shared secret every request but /healthz must carry in X-Api-Key or "
            "Authorization: Bearer (empty: no auth; prefer the environment variable)"
        ),
    ] = ""
    allowed_origins: Annotated[
        str,
        _doc(
            "comma-separated Origins a WebSocket upgrade may come from; an upgrade with "
            "any other Origin header is refused (clients that send none are not affected)"
        ),
    ] = ""
    max_connections: Annotated[
        int,
        msgspec.Meta(ge=1),
        _doc("open connections served at once; one more is answered 503 and closed"),
    ] = 1024
    handshake_timeout_seconds: Annotated[
        float,
        msgspec.Meta(gt=0),
        _doc(
            "seconds a new connection has to send a whole request head, and an idle "
            "keep-alive connection stays open"
        ),
    ] = 10.0
    upload_max_bytes: Annotated[
        int, msgspec.Meta(ge=0), _doc("largest /upload body accepted (0: no limit)")
    ] = 16 * GiB
    ws_compression: Annotated[
        bool, _doc("accept permessage-deflate when a client offers it (costs CPU)")
    ] = False

    upgrade: Annotated[
        bool,
        _doc("allow live upgrades (SIGUSR2, POST /admin/upgrade); --no-upgrade refuses them"),
    ] = True
    upgrade_grace: Annotated[
        float,
        msgspec.Meta(ge=0),
        _doc(
            "after a live upgrade, seconds a session's clients have to come back before "
            "kill_on_disconnect and the idle clock treat them as gone"
        ),
    ] = 30.0
    upgrade_drain_seconds: Annotated[
        float,
        msgspec.Meta(ge=0),
        _doc(
            "seconds in-flight HTTP requests (upload, download, search, POST /execute) "
            "may take to finish before a live upgrade is refused"
        ),
    ] = 10.0

    def listen_host_port(self) -> tuple[str, int]:
        """Split ``listen`` into host and port; raises ``ValueError`` when malformed."""
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"--listen wants HOST:PORT, got {self.listen!r}")
        return host.strip("[]"), int(port)
