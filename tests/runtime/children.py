"""Helpers of the runtime tests that start real children: requests, runs and fd cleanup."""

from __future__ import annotations

import os

import trio

from sandboxd.core.session import ExitStatus
from sandboxd.runtime import process, spawn
from sandboxd.runtime.spawner import SpawnHelper

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def shell_request(command: str, **fields: object) -> spawn.SpawnRequest:
    settings: dict[str, object] = {
        "argv": ["/bin/bash", "-c", command],
        "env": ENV,
        "cwd": "/",
        "close_stdin": True,
    }
    settings.update(fields)
    return spawn.SpawnRequest(**settings)  # type: ignore[arg-type]


def close_fds(child: spawn.Child) -> None:
    for fd in (child.output_fd, child.error_fd, child.input_fd, child.terminal_fd):
        if fd is not None:
            os.close(fd)


async def run_to_exit(
    reaper: process.Reaper,
    req: spawn.SpawnRequest,
    stdin: bytes = b"",
    helper: SpawnHelper | None = None,
) -> tuple[ExitStatus, bytes]:
    """Run ``req`` to its end; its stdout (or terminal) output and its status.

    ``stdin`` is written first, then a pipe stdin is closed. With ``helper``, the spawner
    helper starts it; else ``spawn.spawn`` does, on the loop.
    """
    since = reaper.sequence  # (a child the helper started can be reaped before watch)
    child = await spawn.start(spawn.spawn, req, helper)
    if stdin:
        assert child.input_fd is not None
        os.write(child.input_fd, stdin)
    if child.input_fd is not None and not child.pty:
        os.close(child.input_fd)
        child.input_fd = None
    done = trio.Event()
    statuses: list[ExitStatus] = []

    def on_exit(status: ExitStatus) -> None:
        statuses.append(status)
        done.set()

    reaper.watch(child, on_exit, since)
    output = b""
    stream = trio.lowlevel.FdStream(child.output_fd)
    try:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            output += data
    finally:
        await stream.aclose()
        for fd in (child.error_fd, child.input_fd, child.terminal_fd):
            if fd is not None:
                os.close(fd)
    await done.wait()
    return statuses[0], output


def assert_clean_start(pid: int) -> None:
    """``pid`` has only fds 0-2, no signal blocked and signals 1-31 at their default.

    (glibc's posix_spawn leaves its own internal signals 32 and 33 ignored; glibc
    programs reinstall those themselves.)"""
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    where = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds if fd > 2}
    assert fds == [0, 1, 2], where
    with open(f"/proc/{pid}/status") as status_file:
        status = dict(line.split(":\t", 1) for line in status_file.read().splitlines())
    assert status["SigBlk"].strip() == "0000000000000000"
    assert int(status["SigIgn"], 16) & 0x7FFFFFFF == 0, status["SigIgn"]


class Terminal:
    """A PTY child driven as a person at a terminal would: type, then wait for text."""

    def __init__(self, child: spawn.Child) -> None:
        assert child.pty and child.input_fd is not None
        self.child = child
        self.stream = trio.lowlevel.FdStream(child.output_fd)
        self.seen = b""
        self._cursor = 0

    def type(self, keys: bytes) -> None:
        assert self.child.input_fd is not None
        os.write(self.child.input_fd, keys)

    async def expect(self, text: bytes) -> bytes:
        """Read until ``text`` appears after what earlier calls matched; what came before it."""
        while text not in self.seen[self._cursor :]:
            data = await self.stream.receive_some(65536)
            assert data, f"end of output while waiting for {text!r}: {self.seen[-500:]!r}"
            self.seen += data
        end = self.seen.index(text, self._cursor) + len(text)
        before, self._cursor = self.seen[self._cursor : end], end
        return before
