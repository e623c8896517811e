"""The accept loop (``http/listener._accept``) on a real listening socket."""

from __future__ import annotations

import errno
import socket
from typing import cast

import trio

from sandboxd.http.listener import _ACCEPT_STREAK, AcceptControl, _accept
from tests.helpers import counting_ticks


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def test_every_connection_is_counted_at_its_accept_and_handed_to_the_handler() -> None:
    listener = _listening()
    control = AcceptControl()
    served: list[bytes] = []
    counted_when_served: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        counted_when_served.append(control.connections)
        served.append(await stream.receive_some(16))
        stream.socket.close()
        control.connection_ended()

    clients = [socket.create_connection(listener.getsockname()) for _ in range(40)]
    for n, client in enumerate(clients):
        client.sendall(b"%d" % n)
    with trio.fail_after(10), listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, listener.dup(), control, nursery, handler)
            while len(served) < len(clients):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    for client in clients:
        client.close()
    assert sorted(served) == sorted(b"%d" % n for n in range(40))
    # A streak of accepts goes by, each counted, before the first handler runs.
    assert counted_when_served[0] >= _ACCEPT_STREAK
    assert control.connections == 0


async def test_a_burst_of_connections_does_not_hold_the_loop() -> None:
    listener = _listening()
    control = AcceptControl()
    accepted = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        stream.socket.close()
        control.connection_ended()

    clients = [socket.create_connection(listener.getsockname()) for _ in range(100)]
    with trio.fail_after(10), listener:
        async with counting_ticks() as ticks, trio.open_nursery() as nursery:
            start = ticks.count
            nursery.start_soon(_accept, listener.dup(), control, nursery, handler)
            while accepted < len(clients):
                await trio.lowlevel.checkpoint()
            assert ticks.count - start >= 100 // _ACCEPT_STREAK
            nursery.cancel_scope.cancel()
    for client in clients:
        client.close()


class _ExhaustedOnce:
    """A listening socket whose first accept fails as if the process were out of fds
    (EMFILE), and whose second hands over a real connection."""

    def __init__(self, real: socket.socket) -> None:
        self._real = real
        self.calls = 0

    def setblocking(self, flag: bool) -> None:
        self._real.setblocking(flag)

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return self._real.accept()

    def fileno(self) -> int:
        return self._real.fileno()

    def close(self) -> None:
        self._real.close()


async def test_running_out_of_fds_pauses_accepting_and_then_serves_the_connection() -> None:
    listener = _listening()
    control = AcceptControl()
    served = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        stream.socket.close()
        control.connection_ended()
        served.set()

    client = socket.create_connection(listener.getsockname())
    exhausted = _ExhaustedOnce(listener.dup())
    with trio.fail_after(10), listener, client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, cast(socket.socket, exhausted), control, nursery, handler)
            await served.wait()
            nursery.cancel_scope.cancel()
    assert exhausted.calls >= 2
