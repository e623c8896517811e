"""Spawning: exit codes of exec failures, spawn failures, child hygiene, PTYs (real processes)."""

from __future__ import annotations

import os
import pathlib
import signal
import time

import pytest
import trio

from sandboxd.core.errors import InvalidRequest, SpawnFailed
from sandboxd.runtime import process, spawn
from tests.runtime.children import close_fds, request, run_to_exit


async def test_exec_errors_inside_the_shell_are_126_and_127(tmp_path: pathlib.Path) -> None:
    not_executable = tmp_path / "data.txt"
    not_executable.write_text("just data")
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            missing, _ = await run_to_exit(reaper, request("/no/such/program"))
            not_exec, _ = await run_to_exit(reaper, request(str(not_executable)))
            nursery.cancel_scope.cancel()
    assert (missing.code, not_exec.code) == (127, 126)


def test_a_missing_shell_or_work_dir_or_user_is_a_spawn_failure() -> None:
    with pytest.raises(SpawnFailed, match="cannot run"):
        spawn.spawn(request("true", argv=["/no/shell", "-c", "true"]))
    with pytest.raises(SpawnFailed, match="work dir"):
        spawn.spawn(request("true", cwd="/no/such/dir"))
    with pytest.raises(SpawnFailed, match="unknown user"):
        spawn.spawn(request("true", user="no-such-user-x"))
    with pytest.raises(InvalidRequest):
        spawn.spawn(request("true", user=":0"))
    assert os.getcwd() == os.getcwd()  # the daemon's own cwd is restored


async def test_children_get_only_fds_0_to_2_and_default_signal_state() -> None:
    os.set_inheritable(os.open("/dev/null", os.O_RDONLY), True)  # as a careless parent might
    spawn.close_inherited_fds_on_exec()
    child = spawn.spawn(request("", argv=["/bin/sleep", "30"], close_stdin=False))
    try:
        # posix_spawn returns after the exec, but sleep briefly opens files of its own
        # while it starts (locale data): look once it sits in its nanosleep.
        deadline = time.monotonic() + 5
        while "sleep" not in pathlib.Path(f"/proc/{child.pid}/wchan").read_text():
            assert time.monotonic() < deadline, "sleep never went to sleep"
            time.sleep(0.005)
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{child.pid}/fd"))
        where = {fd: os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in fds if fd > 2}
        assert fds == [0, 1, 2], where
        with open(f"/proc/{child.pid}/status") as status_file:
            status = dict(line.split(":\t", 1) for line in status_file.read().splitlines())
        assert status["SigBlk"].strip() == "0000000000000000"
        # Signals 1-31 are all at their default, SIGPIPE included (Python ignores it in
        # the daemon). glibc's posix_spawn leaves its own internal signals 32 and 33
        # ignored; glibc programs reinstall those themselves.
        assert int(status["SigIgn"], 16) & 0x7FFFFFFF == 0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        os.waitpid(child.pid, 0)  # noqa: ASYNC222 - no reaper runs in this test
        close_fds(child)


async def test_a_broken_pipe_kills_quietly_as_in_a_terminal() -> None:
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            status, out = await run_to_exit(reaper, request("yes 2>&1 | head -1"))
            nursery.cancel_scope.cancel()
    assert (status.code, out) == (0, b"y\n")


async def test_a_pty_child_has_the_terminal_as_its_controlling_tty_at_the_set_size() -> None:
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            status, out = await run_to_exit(
                reaper, request("tty; stty size; ps -o tty= -p $$", pty=True, cols=132, rows=43)
            )
            nursery.cancel_scope.cancel()
    tty, size, ctty = out.decode().split("\r\n")[:3]
    assert tty.startswith("/dev/pts/") and size == "43 132"
    assert ctty.strip() == tty.removeprefix("/dev/")
    assert status.code == 0
