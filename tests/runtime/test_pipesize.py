"""Output pipes: a privileged daemon widens them to a frame; an unprivileged one does not."""

from __future__ import annotations

import fcntl
import os

import pytest
import trio

from sandboxd.core.session import ExitStatus
from sandboxd.runtime import pipesize, process, spawn
from tests.runtime.children import shell_request


def _size_after_widen(monkeypatch: pytest.MonkeyPatch, privileged: bool) -> tuple[int, int]:
    monkeypatch.setattr(pipesize, "privileged", lambda: privileged)
    read_end, write_end = os.pipe()
    try:
        before = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
        pipesize.widen(read_end)
        return before, fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_privileged_daemon_widens_a_pipe_to_a_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 KiB is under /proc/sys/fs/pipe-max-size, so any user may ask for it.
    assert _size_after_widen(monkeypatch, True)[1] == pipesize.PIPE_BYTES


def test_an_unprivileged_daemon_leaves_pipes_at_the_kernel_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before, after = _size_after_widen(monkeypatch, False)
    assert after == before < pipesize.PIPE_BYTES


@pytest.mark.skipif(not pipesize.privileged(), reason="the daemon widens pipes only as root")
async def test_a_command_writes_200_kb_to_its_stdout_while_nobody_reads() -> None:
    # With the kernel's 64 KiB pipe the write would block until the daemon reads.
    reaper = process.Reaper()
    statuses: list[ExitStatus] = []
    done = trio.Event()

    def on_exit(status: ExitStatus) -> None:
        statuses.append(status)
        done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            child = spawn.spawn(
                shell_request("head -c 200000 /dev/zero; head -c 200000 /dev/zero >&2")
            )
            reaper.watch(child, on_exit)
            await done.wait()  # exited before anything was read
            assert child.error_fd is not None
            out = os.read(child.output_fd, 1 << 20)
            err = os.read(child.error_fd, 1 << 20)
            os.close(child.output_fd)
            os.close(child.error_fd)
            nursery.cancel_scope.cancel()
    assert statuses[0].code == 0
    assert (len(out), len(err)) == (200_000, 200_000)
