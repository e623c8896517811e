"""What an endpoint needs of a WebSocket: whole messages in, batches of messages out.

``http/websocket.py`` implements it on the raw socket (the lean path every fresh upgrade
to ``/execute/ws`` and ``/tunnel`` takes); ``AsgiTransport`` implements it on hypercorn's
ASGI events, for the upgrades hypercorn still serves (one that follows an HTTP request on
a kept-alive connection, and permessage-deflate offers under ``--ws-compression``).

A send on a connection that is gone raises ``trio.BrokenResourceError`` or
``trio.ClosedResourceError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import trio


class MessageTransport(Protocol):
    """One accepted WebSocket."""

    async def receive(self) -> str | bytes | None:
        """The client's next whole message; None once its side has ended (a close frame,
        a protocol error the transport answered, or a dropped connection)."""
        ...

    async def send(
        self,
        messages: Sequence[bytes],
        *,
        binary: bool = False,
        close: int | None = None,
        ping: bytes | None = None,
    ) -> None:
        """Send ``messages`` (JSON text, or binary) in one write where the transport can,
        followed by a ping with payload ``ping`` (only where ``on_pong`` accepted a
        handler) or a close frame with code ``close`` if given. Nothing is sent after a
        close."""
        ...

    def on_pong(self, handler: Callable[[bytes], None]) -> bool:
        """Call ``handler`` with the payload of every pong the client sends (from inside
        ``receive``). False when this transport cannot see pongs: then send no pings."""
        ...


class AsgiTransport:
    """``MessageTransport`` over ASGI ``receive``/``send`` callables."""

    def __init__(
        self,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        # One batch at a time: nothing may land between a terminal frame and its close.
        self._lock = trio.Lock()

    async def receive(self) -> str | bytes | None:
        while True:
            event = await self._receive()
            if event["type"] == "websocket.disconnect":
                return None
            if event["type"] == "websocket.receive":
                text = event.get("text")
                if text is not None:
                    return str(text)
                return bytes(event.get("bytes") or b"")

    def on_pong(self, handler: Callable[[bytes], None]) -> bool:
        return False  # ASGI has no pong event: hypercorn answers pings and drops pongs

    async def send(
        self,
        messages: Sequence[bytes],
        *,
        binary: bool = False,
        close: int | None = None,
        ping: bytes | None = None,
    ) -> None:
        async with self._lock:
            if self._closed:
                return
            if close is not None:
                self._closed = True
            for message in messages:
                if binary:
                    await self._send({"type": "websocket.send", "bytes": message})
                else:
                    await self._send({"type": "websocket.send", "text": message.decode()})
            if close is not None:
                await self._send({"type": "websocket.close", "code": close})
