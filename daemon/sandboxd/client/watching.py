"""The verbs that look at commands without attaching to them: ``ps``, ``logs``, ``kill``
and ``web``. Their WebSockets are watching reconnects (``"watch": true``): they never
stop or restart a command's idle clock and never trigger ``kill_on_disconnect``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from sandboxd.client import http
from sandboxd.client.connection import CliError, CommandStream, Endpoint
from sandboxd.client.terminal import write_all


def _row(rows: list[dict[str, Any]], command_id: str) -> dict[str, Any]:
    for row in rows:
        if row["command_id"] == command_id:
            return row
    raise CliError(f"no command with id {command_id} (never started, or expired)")


def _age(started: float | None, now: float) -> str:
    if started is None:
        return "-"
    seconds = max(0, int(now - started))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _state(row: dict[str, Any]) -> str:
    if row["state"] == "running":
        return "running"
    reason = row.get("reason")
    if reason and reason != "exited":
        return f"{reason}({row.get('exit_code')})"
    return f"exited({row.get('exit_code')})"


def ps(endpoint: Endpoint, show_all: bool, as_json: bool, quiet: bool) -> int:
    """List the daemon's commands (running ones; ``-a``: finished ones within TTL too)."""
    rows = [r for r in http.sessions(endpoint) if show_all or r["state"] == "running"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if quiet:
        for row in rows:
            print(row["command_id"])
        return 0
    now = time.time()
    table = [("ID", "PID", "STATE", "PTY", "CLIENTS", "STARTED", "COMMAND")]
    for row in rows:
        clients = str(row["clients"]) + (f"+{row['watchers']}w" if row.get("watchers") else "")
        table.append(
            (
                row["command_id"],
                str(row["pid"]),
                _state(row),
                "yes" if row["pty"] else "no",
                clients,
                _age(row.get("started_at"), now),
                " ".join(str(row["command"]).split())[:60],
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())
    return 0


class _Tail:
    """The last ``count`` lines of the output seen, per stream, in arrival order."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.lines: list[tuple[int, bytes]] = []  # (fd, line)
        self._partial = {1: b"", 2: b""}

    def add(self, fd: int, data: bytes) -> None:
        pieces = (self._partial[fd] + data).split(b"\n")
        self._partial[fd] = pieces.pop()
        self.lines.extend((fd, piece + b"\n") for piece in pieces)
        del self.lines[: max(0, len(self.lines) - self.count)]

    def flush(self) -> None:
        tail = self.lines + [(fd, rest) for fd, rest in self._partial.items() if rest]
        for fd, line in tail[-self.count :] if self.count else []:
            write_all(fd, line)


def logs(
    endpoint: Endpoint, command_id: str, follow: bool, tail: int | None, streams: set[str]
) -> int:
    """Print a command's output so far (``-f``: and then as it comes, until it ends)."""
    row = _row(http.sessions(endpoint), command_id)
    stop = {"stdout": row["stdout_bytes"], "stderr": row["stderr_bytes"]}
    stream = CommandStream(endpoint, command_id, watch=True)
    lines = _Tail(tail) if tail is not None else None
    live = False
    seen = {"stdout": 0, "stderr": 0}
    try:
        for frame in stream.iterate():
            kind = frame.get("type")
            if kind in ("stdout", "stderr"):
                seen[kind] = frame["end"]
                fd = 1 if kind == "stdout" else 2
                if kind not in streams:
                    pass
                elif lines is not None and not live:
                    lines.add(fd, frame["bytes"])
                else:
                    write_all(fd, frame["bytes"])
            elif kind == "gap":
                seen[frame["stream"]] = max(seen[frame["stream"]], int(frame["to"]))
            if not live and seen["stdout"] >= stop["stdout"] and seen["stderr"] >= stop["stderr"]:
                if lines is not None:
                    lines.flush()
                if not follow:
                    return 0
                live = True
            if kind == "gap":
                sys.stderr.write(
                    f"[sandboxd: bytes {frame['from']}-{frame['to']} of "
                    f"{frame['stream']} were dropped]\n"
                )
        if lines is not None and not live:
            lines.flush()
        return 0
    finally:
        if stream.ws is not None:
            stream.ws.close()


def kill(endpoint: Endpoint, command_ids: list[str], signal_name: str | None) -> int:
    """Kill commands (their whole tree), or send them ``signal_name``."""
    rows = http.sessions(endpoint)
    for command_id in command_ids:
        row = _row(rows, command_id)
        if row["state"] != "running":
            raise CliError(f"{command_id} is not running ({_state(row)})")
    for command_id in command_ids:
        stream = CommandStream(endpoint, command_id, watch=True)
        try:
            for frame in stream.iterate():
                if frame.get("type") == "started":
                    if signal_name is None:
                        stream.send(type="kill")
                    else:
                        stream.send(type="signal", signal=signal_name)
                        break
        finally:
            if stream.ws is not None:
                stream.ws.close()
    return 0


def web(endpoint: Endpoint) -> int:
    """Print the URL of the browser terminal (the token rides in the fragment)."""
    url = endpoint.url.rstrip("/") + "/"
    print(url + (f"#token={endpoint.token}" if endpoint.token else ""))
    return 0
