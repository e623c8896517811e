"""Plain HTTP requests to the daemon (``/sessions``, ``/upload``, ``/download``, ``/glob``)
with ``http.client``; errors become ``CliError`` through the endpoint's wording."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from typing import Any, BinaryIO

from sandboxd.client.connection import CliError, Endpoint

CHUNK = 1024 * 1024


class Response:
    """An open response: status, headers, and a body to read or stream."""

    def __init__(self, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse) -> None:
        self._conn = conn
        self.raw = raw
        self.status = raw.status

    def read(self) -> bytes:
        try:
            return self.raw.read()
        finally:
            self._conn.close()

    def copy_to(self, out: BinaryIO) -> int:
        """Stream the body into ``out``; the byte count."""
        total = 0
        try:
            while chunk := self.raw.read(CHUNK):
                out.write(chunk)
                total += len(chunk)
        finally:
            self._conn.close()
        return total


def request(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    what: str | None = None,
) -> Response:
    """Send one request; a 2xx ``Response``, else ``CliError`` (``what`` names the ask)."""
    target = endpoint.target
    conn: http.client.HTTPConnection
    if target.tls:
        conn = http.client.HTTPSConnection(
            target.host, target.port, timeout=endpoint.connect_timeout
        )
    else:
        conn = http.client.HTTPConnection(
            target.host, target.port, timeout=endpoint.connect_timeout
        )
    sent = {**endpoint.headers, **(headers or {})}
    try:
        conn.request(method, target.prefix + path, body=body, headers=sent)
        raw = conn.getresponse()
    except OSError as exc:
        conn.close()
        raise endpoint.unreachable(exc.strerror or str(exc)) from None
    except http.client.HTTPException as exc:
        conn.close()
        raise CliError(f"bad answer from {endpoint.url}: {exc!r}") from None
    conn.sock.settimeout(None) if conn.sock is not None else None
    response = Response(conn, raw)
    if not 200 <= raw.status < 300:
        raise endpoint.refused(raw.status, response.read(), what or path.split("?")[0])
    return response


def get_json(endpoint: Endpoint, path: str) -> Any:
    """GET ``path`` and decode its JSON body."""
    return json.loads(request(endpoint, "GET", path).read())


def post_json(endpoint: Endpoint, path: str, payload: object) -> Any:
    """POST ``payload`` as JSON to ``path``; the decoded answer."""
    body = json.dumps(payload).encode()
    response = request(endpoint, "POST", path, body, {"Content-Type": "application/json"})
    return json.loads(response.read())


def sessions(endpoint: Endpoint) -> list[dict[str, Any]]:
    """The rows of ``GET /sessions``."""
    rows: list[dict[str, Any]] = get_json(endpoint, "/sessions")["sessions"]
    return rows
