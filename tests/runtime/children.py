"""Helpers of the runtime tests that start real children: requests, runs and fd cleanup."""

from __future__ import annotations

import os

import trio

from sandboxd.core.session import ExitStatus
from sandboxd.runtime import process, spawn

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def request(command: str, **fields: object) -> spawn.SpawnRequest:
    settings: dict[str, object] = {
        "argv": ["/bin/bash", "-c", command],
        "env": ENV,
        "cwd": "/",
        "close_stdin": True,
    }
    settings.update(fields)
    return spawn.SpawnRequest(**settings)  # type: ignore[arg-type]


def close_fds(child: spawn.Child) -> None:
    for fd in (child.output_fd, child.error_fd, child.input_fd):
        if fd is not None:
            os.close(fd)


async def run_to_exit(reaper: process.Reaper, req: spawn.SpawnRequest) -> tuple[ExitStatus, bytes]:
    child = spawn.spawn(req)
    done = trio.Event()
    statuses: list[ExitStatus] = []

    def on_exit(status: ExitStatus) -> None:
        statuses.append(status)
        done.set()

    reaper.watch(child, on_exit)
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
        for fd in (child.error_fd, child.input_fd):
            if fd is not None:
                os.close(fd)
    await done.wait()
    return statuses[0], output
