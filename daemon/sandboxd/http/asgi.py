"""Small ASGI helpers for the HTTP endpoints: query and header lookup, bounded bodies,
and responses, errors always in the ``{"detail": {"error", "message"}}`` shape (§1.3)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any, TypeVar
from urllib.parse import parse_qs

import msgspec

from sandboxd.core.errors import InvalidRequest, PayloadTooLarge, SandboxdError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T")

#: Largest JSON request body accepted.
JSON_BODY_LIMIT = 1024 * 1024

_encoder = msgspec.json.Encoder()


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def query_param(scope: Scope, name: str) -> str | None:
    """The first value of query parameter ``name`` (URL-decoded), or None."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    found = values.get(name)
    return found[0] if found else None


def header(scope: Scope, name: str) -> str | None:
    """A request header by case-insensitive name, or None."""
    wanted = name.lower().encode()
    for key, value in scope["headers"]:
        if key.lower() == wanted:
            return bytes(value).decode("latin-1")
    return None


async def body_chunks(receive: Receive) -> AsyncGenerator[bytes, None]:
    """Yield the request body as it arrives; raises ``ClientGone`` on a disconnect.

    Use it inside ``contextlib.aclosing`` so that an early exit closes it at once.
    """
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise ClientGone()
        chunk = event.get("body", b"")
        if chunk:
            yield chunk
        if not event.get("more_body", False):
            return


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refused past ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    async with aclosing(body_chunks(receive)) as chunks:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
            parts.append(chunk)
    return b"".join(parts)


def refuse_declared_over(scope: Scope, limit: float) -> None:
    """``PayloadTooLarge`` at once when the request's Content-Length is over ``limit``
    (nothing of the body is read: the client gets its 413 while still sending)."""
    declared = header(scope, "content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over {limit:.0f}")


async def read_json(scope: Scope, receive: Receive, kind: type[T]) -> T:
    """The request body decoded as ``kind``; ``InvalidRequest`` says what is wrong."""
    refuse_declared_over(scope, JSON_BODY_LIMIT)
    body = await read_body(receive, JSON_BODY_LIMIT)
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"bad request body: {exc}") from None


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    *,
    content_type: str | None = "application/json",
    headers: Iterable[tuple[str, str]] = (),
    content_length: int | None = None,
    send_body: bool = True,
) -> None:
    """A complete response. ``content_length`` overrides ``len(body)`` (HEAD)."""
    raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers]
    if content_type is not None:
        raw.append((b"content-type", content_type.encode()))
    length = len(body) if content_length is None else content_length
    raw.append((b"content-length", b"%d" % length))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body if send_body else b""})


async def respond_json(send: Send, status: int, payload: object, *, head: bool = False) -> None:
    """``payload`` as a JSON response."""
    await respond(send, status, _encoder.encode(payload), send_body=not head)


def error_body(error_type: str, message: str) -> bytes:
    """The JSON body of every HTTP error: ``{"detail": {"error", "message"}}``."""
    return _encoder.encode({"detail": {"error": error_type, "message": message}})


async def respond_error(
    send: Send, exc: SandboxdError, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """``exc`` as its HTTP status with the ``detail`` body."""
    await respond(send, exc.http_status, error_body(exc.error_type, exc.message), headers=headers)
