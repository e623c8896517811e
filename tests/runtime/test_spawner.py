"""The spawner helper: commands it starts are the daemon's children, as clean as the
loop's own spawns; failures, concurrency, cancellation and a dead helper (real processes)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import time
from collections.abc import AsyncIterator

import psutil
import pytest
import trio

from sandboxd.core.errors import SpawnFailed
from sandboxd.core.session import ExitStatus
from sandboxd.runtime import process, spawn, spawner
from tests.runtime.children import (
    assert_clean_start,
    close_fds,
    run_to_exit,
    shell_request,
)
from tests.runtime.test_spawn import LONG_PREFIX


@contextlib.asynccontextmanager
async def running_helper() -> AsyncIterator[tuple[process.Reaper, spawner.SpawnHelper]]:
    """A reaper and a helper started now, both running until the block ends."""
    reaper = process.Reaper()
    reaper.reap_all()  # what earlier tests in this process left unreaped is not ours
    reaper.orphans_reaped = 0
    helper = spawner.SpawnHelper.start(reaper)
    assert helper is not None, f"{spawner.PROGRAM} is not built: make spawner"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            nursery.start_soon(helper.run)
            try:
                yield reaper, helper
            finally:
                nursery.cancel_scope.cancel()
    finally:
        helper.stop()  # as service.serve does once its reaper no longer runs
    assert helper.reaped and not helper.running


def _wait_until_asleep(pid: int) -> None:
    deadline = time.monotonic() + 10
    while "sleep" not in pathlib.Path(f"/proc/{pid}/wchan").read_text():
        assert time.monotonic() < deadline, "sleep never went to sleep"
        time.sleep(0.005)


async def test_a_command_from_the_helper_is_the_daemons_child_in_a_session_of_its_own() -> None:
    with trio.fail_after(10):
        async with running_helper() as (reaper, helper):
            child = await spawn.start(
                spawn.spawn, shell_request("exec /bin/sleep 30", close_stdin=False), helper
            )
            reaper.watch(child, lambda _status: None)
            try:
                _wait_until_asleep(child.pid)
                assert psutil.Process(child.pid).ppid() == os.getpid() != helper.pid
                assert os.getsid(child.pid) == os.getpgid(child.pid) == child.pid
            finally:
                os.kill(child.pid, signal.SIGKILL)
                close_fds(child)
            status, out = await run_to_exit(reaper, shell_request("echo hi; exit 7"), b"", helper)
    assert (status.code, out) == (7, b"hi\n")
    assert reaper.orphans_reaped == 0


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
@pytest.mark.parametrize("stdin", [False, True], ids=["null-stdin", "pipe-stdin"])
async def test_children_from_the_helper_get_only_fds_0_to_2_and_default_signal_state(
    long: bool, pty: bool, stdin: bool
) -> None:
    # As a daemon started by nohup, or from a shell that blocked a signal, might have them
    # when it starts its helper.
    previous_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        with trio.fail_after(10):
            async with running_helper() as (_reaper, helper):
                command = (LONG_PREFIX if long else "") + "exec /bin/sleep 30"
                request = shell_request(command, close_stdin=not stdin, pty=pty)
                child = await helper.spawn(request)
                try:
                    _wait_until_asleep(child.pid)
                    assert_clean_start(child.pid)
                    stdin_target = os.readlink(f"/proc/{child.pid}/fd/0")
                    if pty:
                        assert stdin_target.startswith("/dev/pts/")
                    else:
                        assert (stdin_target == "/dev/null") == (not stdin)
                finally:
                    os.kill(child.pid, signal.SIGKILL)
                    close_fds(child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        signal.signal(signal.SIGQUIT, previous_quit)


async def test_a_pty_command_from_the_helper_has_the_terminal_as_its_controlling_tty() -> None:
    script = "tty; stty size; ps -o tty= -p $$"
    with trio.fail_after(10):
        async with running_helper() as (reaper, helper):
            request = shell_request(script, pty=True, cols=100, rows=30)
            status, out = await run_to_exit(reaper, request, b"", helper)
    tty, size, ctty = out.decode().split("\r\n")[:3]
    assert tty.startswith("/dev/pts/") and size == "30 100"
    assert ctty.strip() == tty.removeprefix("/dev/")
    assert status.code == 0


async def test_the_helper_passes_the_environment_argv_and_work_dir_exactly(
    tmp_path: pathlib.Path,
) -> None:
    env = {"PATH": "/usr/bin:/bin", "EMPTY": "", "SPACES": " a  b ", "UTF8": "é✓"}
    script = 'printf "%s|" "$0" "$1" "$PWD"; env -0 | sort -z | tr "\\0" "\\n"'
    request = shell_request(
        script, argv=["/bin/bash", "-c", script, "name", ""], env=env, cwd=str(tmp_path)
    )
    with trio.fail_after(10):
        async with running_helper() as (reaper, helper):
            status, out = await run_to_exit(reaper, request, b"", helper)
    assert status.code == 0
    fields = out.decode().split("|")
    assert fields[:3] == ["name", "", str(tmp_path)]
    shown = dict(line.split("=", 1) for line in fields[3].splitlines() if line)
    assert {k: v for k, v in shown.items() if k not in ("PWD", "SHLVL", "_", "OLDPWD")} == env


async def test_exec_and_work_dir_failures_are_spawn_failures_and_leave_no_orphan(
    tmp_path: pathlib.Path,
) -> None:
    with trio.fail_after(10):
        async with running_helper() as (reaper, helper):
            fds_before = set(os.listdir("/proc/self/fd"))
            with pytest.raises(SpawnFailed, match="cannot run '/no/shell': No such file"):
                await helper.spawn(shell_request("true", argv=["/no/shell", "-c", "true"]))
            with pytest.raises(SpawnFailed, match="work dir '/no/such/dir': No such file"):
                await helper.spawn(shell_request("true", cwd="/no/such/dir"))
            with pytest.raises(SpawnFailed, match=r"cannot run .*: Permission denied"):
                await helper.spawn(shell_request("true", argv=[str(tmp_path), "-c", "true"]))
            assert set(os.listdir("/proc/self/fd")) == fds_before  # nothing left open
            while reaper.watched > 1:  # the failed children, reaped (the helper is the 1)
                await trio.sleep(0.01)
            assert reaper.orphans_reaped == 0
            status, _ = await run_to_exit(reaper, shell_request("true"), b"", helper)
    assert status.code == 0  # and the helper goes on serving


async def test_a_nul_in_an_argument_the_environment_or_the_work_dir_is_refused_at_once() -> None:
    with trio.fail_after(10):
        async with running_helper() as (_reaper, helper):
            fds_before = set(os.listdir("/proc/self/fd"))
            bad = [
                shell_request("true", argv=["/bin/bash", "-c", "true", "a\0b"]),
                shell_request("true", env={"PATH": "/bin", "X": "a\0b"}),
                shell_request("true", env={"A=B": "c"}),
                shell_request("true", cwd="/\0tmp"),
            ]
            for request in bad:
                with pytest.raises(ValueError):
                    await helper.spawn(request)
            assert set(os.listdir("/proc/self/fd")) == fds_before
            assert helper.running


async def test_a_hundred_spawns_at_once_each_get_their_own_command() -> None:
    outputs: dict[int, tuple[int, bytes]] = {}
    with trio.fail_after(30):
        async with running_helper() as (reaper, helper):

            async def one(index: int) -> None:
                request = shell_request(f"echo {index}; exit {index % 50}")
                status, out = await run_to_exit(reaper, request, b"", helper)
                outputs[index] = (status.code, out)

            async with trio.open_nursery() as nursery:
                for index in range(100):
                    nursery.start_soon(one, index)
    assert outputs == {i: (i % 50, f"{i}\n".encode()) for i in range(100)}
    assert reaper.orphans_reaped == 0


async def test_a_spawn_once_sent_is_not_abandoned_when_its_caller_is_cancelled() -> None:
    with trio.fail_after(10):
        async with running_helper() as (reaper, helper):
            statuses: list[ExitStatus] = []
            with trio.CancelScope() as scope:
                scope.cancel()
                since = reaper.sequence
                child = await helper.spawn(shell_request("exit 3"))  # the answer, not Cancelled
                reaper.watch(child, statuses.append, since)
                close_fds(child)
            while not statuses:
                await trio.sleep(0.01)
    assert statuses[0].code == 3


async def test_a_dead_helper_fails_the_spawn_it_held_and_later_ones_run_on_the_loop() -> None:
    with trio.fail_after(10):
        async with running_helper() as (reaper, helper):
            os.kill(helper.pid, signal.SIGSTOP)  # so that a request is surely in flight
            failures: list[BaseException] = []

            async def held() -> None:
                try:
                    await helper.spawn(shell_request("echo never"))
                except SpawnFailed as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(held)
                await trio.testing.wait_all_tasks_blocked()
                os.kill(helper.pid, signal.SIGKILL)
            assert isinstance(failures[0], spawner.SpawnerGone)
            assert not helper.running
            status, out = await run_to_exit(reaper, shell_request("echo loop"), b"", helper)
            assert (status.code, out) == (0, b"loop\n")
            while not helper.reaped:
                await trio.sleep(0.01)
            assert reaper.watched == 0  # the reaper collected the helper: no owner left
    assert reaper.orphans_reaped == 0


async def test_a_request_the_helper_dies_in_the_middle_of_is_run_on_the_loop() -> None:
    # 1.5 MB: far past the socket's buffer, within what an exec takes
    big = {"PATH": "/usr/bin:/bin"} | {f"BIG{i}": "x" * 100_000 for i in range(15)}
    with trio.fail_after(20):
        async with running_helper() as (reaper, helper):
            os.kill(helper.pid, signal.SIGSTOP)  # it reads nothing: the send stops part way
            results: list[tuple[ExitStatus, bytes]] = []

            async def one() -> None:
                request = shell_request('echo "${#BIG0}${#BIG14}"', env=big)
                results.append(await run_to_exit(reaper, request, b"", helper))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                await trio.testing.wait_all_tasks_blocked()
                assert results == [] and helper.running
                os.kill(helper.pid, signal.SIGKILL)
            assert not helper.running
    assert [(status.code, out) for status, out in results] == [(0, b"100000100000\n")]
    assert reaper.orphans_reaped == 0


async def test_helpers_of_a_previous_image_are_collected_and_not_orphans() -> None:
    previous = process.Reaper()  # the previous image's reaper: gone with its image
    old = spawner.SpawnHelper.start(previous)
    assert old is not None
    old_pid = old.pid
    reaper = process.Reaper()
    with trio.fail_after(10):
        old.close()  # as the exec of a new image closes it: the old helper exits
        while psutil.Process(old_pid).status() != psutil.STATUS_ZOMBIE:
            await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:
            assert spawner.collect_old_helpers(reaper) == 1
            await nursery.start(reaper.run)
            while reaper.watched:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert reaper.orphans_reaped == 0
    assert not psutil.pid_exists(old_pid)


async def test_a_spawn_the_dead_helper_never_received_runs_on_the_loop_instead() -> None:
    with trio.fail_after(10):
        async with running_helper() as (reaper, helper):
            os.kill(helper.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            # Dead, and the daemon not told yet (no checkpoint since): the send fails.
            while psutil.Process(helper.pid).status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert helper.running
            status, out = await run_to_exit(reaper, shell_request("echo $PPID"), b"", helper)
            assert not helper.running
    assert (status.code, out) == (0, f"{os.getpid()}\n".encode())
    assert reaper.orphans_reaped == 0


async def test_the_peak_rss_of_a_command_smaller_than_the_daemon_is_still_reported() -> None:
    # Its vfork shared the helper's memory, not the daemon's (which, here, holds more).
    hold = bytearray(64 << 20)
    hold[::4096] = b"x" * len(hold[::4096])  # touched: the test process's peak grows
    script = 'x=$(head -c 20000000 /dev/zero | tr "\\0" a); echo "${#x}"'
    with trio.fail_after(20):
        async with running_helper() as (reaper, helper):
            status, out = await run_to_exit(reaper, shell_request(script), b"", helper)
    assert out == b"20000000\n" and status.code == 0
    assert spawn.own_peak_rss_kib() * 1024 > 64 << 20
    assert status.peak_rss_bytes is not None and status.peak_rss_bytes >= 20_000_000
    del hold
