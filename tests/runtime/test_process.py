"""The single reaper, exit statuses and tree kills (real processes)."""

from __future__ import annotations

import os
import random
import signal

import psutil
import pytest
import trio

from sandboxd.core.errors import InvalidRequest
from sandboxd.core.session import ExitStatus
from sandboxd.runtime import process, spawn
from tests.runtime.children import close_fds, shell_request


@pytest.fixture
async def reaper() -> process.Reaper:
    return process.Reaper()


async def test_500_concurrent_exit_codes_and_signal_deaths_are_all_exact() -> None:
    rng = random.Random(500)
    deaths = [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL, signal.SIGINT]
    plan: list[tuple[list[str], int, int | None]] = []
    for _ in range(500):
        if rng.random() < 0.3:
            signo = int(rng.choice(deaths))  # sent below, once the sleep runs
            plan.append((["/bin/sleep", "30"], 128 + signo, signo))
        else:
            code = rng.randrange(256)
            plan.append((["/bin/bash", "-c", f"exit {code}"], code, None))
    reaper = process.Reaper()
    results: dict[int, ExitStatus] = {}
    expected: dict[int, tuple[int, int | None]] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            for argv, code, signo in plan:
                child = spawn.spawn(shell_request("", argv=argv))
                close_fds(child)
                expected[child.pid] = (code, signo)
                reaper.watch(child, lambda status, pid=child.pid: results.__setitem__(pid, status))
                if signo is not None:
                    os.kill(child.pid, signo)
            while len(results) < len(plan):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    wrong = {
        pid: ((s.code, s.signal), expected[pid])
        for pid, s in results.items()
        if (s.code, s.signal) != expected[pid]
    }
    assert wrong == {}
    assert reaper.watched == 0
    zombies = [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


async def test_kill_tree_takes_the_group_and_descendants_that_left_it() -> None:
    reaper = process.Reaper()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            child = spawn.spawn(
                shell_request("sleep 100 & setsid sleep 100 & echo ready; wait", close_stdin=True)
            )
            statuses: list[ExitStatus] = []
            reaper.watch(child, statuses.append)
            stream = trio.lowlevel.FdStream(child.output_fd)
            assert await stream.receive_some(100) == b"ready\n"
            descendants = psutil.Process(child.pid).children(recursive=True)
            assert len(descendants) == 2
            assert {p.pid for p in descendants} != {os.getpgid(p.pid) for p in descendants}
            process.kill_tree(child.pid)
            while not statuses:
                await trio.sleep(0.02)
            await stream.aclose()
            for fd in (child.error_fd, child.input_fd):
                if fd is not None:
                    os.close(fd)
            nursery.cancel_scope.cancel()
    assert statuses[0].code == 137
    for p in descendants:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def test_signal_names_and_numbers_parse() -> None:
    assert process.parse_signal("INT") == signal.SIGINT
    assert process.parse_signal("sigusr1") == signal.SIGUSR1
    assert process.parse_signal(15) == signal.SIGTERM
    with pytest.raises(InvalidRequest):
        process.parse_signal("NOPE")
    with pytest.raises(InvalidRequest):
        process.parse_signal(0)


async def test_a_child_reaped_before_it_is_watched_still_gets_its_status() -> None:
    reaper = process.Reaper()
    since = reaper.sequence
    child = spawn.spawn(shell_request("exit 7"))
    close_fds(child)
    while reaper.sequence == since:  # it exits and is reaped before anyone watches it
        reaper.reap_all()
        await trio.sleep(0.01)
    statuses: list[ExitStatus] = []
    reaper.watch(child, statuses.append, since=since)
    assert [s.code for s in statuses] == [7]
    assert reaper.orphans_reaped == 0 and reaper.watched == 0


async def test_a_stale_status_of_a_reused_pid_is_not_handed_out() -> None:
    reaper = process.Reaper()
    orphan = spawn.spawn(shell_request("exit 3"))
    close_fds(orphan)
    while reaper.sequence == 0:
        reaper.reap_all()
        await trio.sleep(0.01)
    # A later spawn that happened to get the same pid must not receive that status.
    statuses: list[ExitStatus] = []
    reaper.watch(orphan, statuses.append, since=reaper.sequence)
    assert statuses == [] and reaper.watched == 1
    assert reaper.orphans_reaped == 1
