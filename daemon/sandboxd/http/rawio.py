"""Reads and writes on a connected socket's fd that yield to the event loop only when
the kernel makes them wait.

trio's socket methods take a checkpoint on every call, also one that the kernel served at
once: a full pass through the scheduler per ``send`` and per ``recv``, which for a short
command was a dozen of them. ``RawSocket`` calls ``read``/``writev`` on the non-blocking
fd first and waits (``wait_readable``/``wait_writable``) only when they would block. So
that a peer that keeps the kernel busy (a flood of input, a fast reader of a long replay)
cannot hold the loop, and so that a cancellation is still seen, it takes a checkpoint
after ``STREAK`` calls in a row that did not wait.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

#: Calls served at once, in a row, after which one checkpoint is taken.
STREAK = 16
#: Buffers handed to one ``writev`` (Linux's ``IOV_MAX`` is 1024).
_IOV_MAX = 1024


class RawSocket:
    """Non-blocking I/O on ``sock``'s fd (trio has made it non-blocking).

    The socket itself still belongs to its trio object: closing that (``close``) wakes a
    wait here with ``trio.ClosedResourceError``.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._streak = 0

    def _fd(self) -> int:
        """The fd, or -1 once the socket is closed (never a number reused since)."""
        return self._sock.fileno()

    async def _served_at_once(self) -> None:
        self._streak += 1
        if self._streak >= STREAK:
            self._streak = 0
            await trio.lowlevel.checkpoint()

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` the peer sent; ``b""`` at its EOF or when the connection
        broke (reset, or closed here meanwhile)."""
        while True:
            fd = self._fd()
            if fd < 0:
                return b""
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                self._streak = 0
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    return b""
                continue
            except OSError:
                return b""
            await self._served_at_once()
            return data

    async def send(self, parts: Sequence[bytes]) -> None:
        """Write all of ``parts``, in order (one ``writev`` when the kernel takes them
        all). Raises ``trio.BrokenResourceError`` when the connection is gone."""
        views: list[memoryview] | None = None
        pending: Sequence[bytes | memoryview] = parts
        while True:
            fd = self._fd()
            if fd < 0:
                raise trio.BrokenResourceError("the connection was closed")
            try:
                sent = os.writev(fd, pending[:_IOV_MAX])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if views is None:
                views = [memoryview(part) for part in parts if part]
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if not views:
                await self._served_at_once()
                return
            if sent:
                views[0] = views[0][sent:]
            pending = views
            self._streak = 0
            try:
                await trio.lowlevel.wait_writable(fd)
            except trio.ClosedResourceError as exc:
                raise trio.BrokenResourceError("the connection was closed") from exc
