"""``http/rawio.py``: socket reads and writes that wait only when the kernel makes them,
on a real connected socket pair."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import trio

from sandboxd.http.rawio import STREAK, RawSocket
from tests.helpers import counting_ticks


def _pair() -> tuple[trio.socket.SocketType, socket.socket]:
    ours, theirs = socket.socketpair()
    return trio.socket.from_stdlib_socket(ours), theirs


async def test_receive_returns_what_the_peer_sent_then_empty_at_its_eof() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    with trio.fail_after(5), ours, theirs:
        theirs.sendall(b"hello")
        assert await raw.receive(1024) == b"hello"
        theirs.shutdown(socket.SHUT_WR)
        assert await raw.receive(1024) == b""


async def test_receive_waits_for_data_that_comes_later() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    with trio.fail_after(5), ours, theirs:
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.05)
                theirs.sendall(b"late")

            nursery.start_soon(later)
            assert await raw.receive(1024) == b"late"


async def test_a_receive_waiting_when_the_socket_is_closed_returns_empty() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    received: list[bytes] = []
    with trio.fail_after(5), theirs:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                received.append(await raw.receive(1024))

            nursery.start_soon(receive)
            await trio.sleep(0.05)
            ours.close()
        assert received == [b""]
        assert await raw.receive(1024) == b""  # and after it, never another socket's fd


async def test_send_writes_every_part_in_order_also_past_the_socket_buffer() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    parts = [os.urandom(n) for n in (1, 0, 70_000, 3, 2_000_000, 5)]
    want = b"".join(parts)
    got = bytearray()
    with trio.fail_after(20), ours, theirs:
        theirs.setblocking(False)
        async with trio.open_nursery() as nursery:

            async def read_slowly() -> None:
                while len(got) < len(want):
                    await trio.sleep(0.001)
                    with contextlib.suppress(BlockingIOError):
                        got.extend(theirs.recv(65536))

            nursery.start_soon(read_slowly)
            await raw.send(parts)
    assert bytes(got) == want


async def test_send_to_a_peer_that_is_gone_raises_broken_resource() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    with trio.fail_after(5), ours:
        theirs.close()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the first write may still land in the buffer
                await raw.send([b"x" * 65536])


async def test_send_after_the_socket_is_closed_raises_broken_resource() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    with trio.fail_after(5), theirs:
        ours.close()
        with pytest.raises(trio.BrokenResourceError):
            await raw.send([b"x"])


async def test_operations_the_kernel_serves_at_once_still_let_other_tasks_run() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    rounds = STREAK * 8
    with trio.fail_after(5), ours, theirs:
        theirs.sendall(b"y" * rounds)
        async with counting_ticks() as ticks:
            start = ticks.count
            for _ in range(rounds):  # every one ready at once
                assert await raw.receive(1) == b"y"
                await raw.send([b"z"])
            assert ticks.count - start >= (2 * rounds) // STREAK - 1


async def test_a_cancelled_caller_streaming_without_waits_sees_the_cancellation() -> None:
    ours, theirs = _pair()
    raw = RawSocket(ours)
    with trio.fail_after(5), ours, theirs:
        theirs.sendall(b"w" * (STREAK * 4))
        with trio.CancelScope() as scope:
            scope.cancel()
            for _ in range(STREAK * 4):
                await raw.receive(1)
            pytest.fail("never cancelled")  # pragma: no cover
        assert scope.cancelled_caught
