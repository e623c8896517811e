"""Spawning, the single reaper, exit statuses, child hygiene and tree kills (real processes)."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import time

import psutil
import pytest
import trio

from sandboxd.core.errors import InvalidRequest, SpawnFailed
from sandboxd.core.session import ExitStatus
from sandboxd.runtime import process

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def request(command: str, **fields: object) -> process.SpawnRequest:
    settings: dict[str, object] = {
        "argv": ["/bin/bash", "-c", command],
        "env": ENV,
        "cwd": "/",
        "close_stdin": True,
    }
    settings.update(fields)
    return process.SpawnRequest(**settings)  # type: ignore[arg-type]


def close_fds(child: process.Child) -> None:
    for fd in (child.output_fd, child.error_fd, child.input_fd):
        if fd is not None:
            os.close(fd)


async def run_to_exit(
    reaper: process.Reaper, req: process.SpawnRequest
) -> tuple[ExitStatus, bytes]:
    child = process.spawn(req)
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
                child = process.spawn(request("", argv=argv))
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


def test_a_missing_shell_or_work_dir_or_user_is_a_spawn_failure(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")  # the daemon's own cwd (cli.py), which spawns step out of and back to
    with pytest.raises(SpawnFailed, match="cannot run"):
        # the work dir exists, so the spawn is already inside it when the exec fails
        process.spawn(request("true", argv=["/no/shell", "-c", "true"], cwd=str(tmp_path)))
    assert os.getcwd() == "/"  # the daemon's own cwd is restored after a failed exec
    with pytest.raises(SpawnFailed, match="work dir"):
        process.spawn(request("true", cwd="/no/such/dir"))
    with pytest.raises(SpawnFailed, match="unknown user"):
        process.spawn(request("true", user="no-such-user-x"))
    with pytest.raises(InvalidRequest):
        process.spawn(request("true", user=":0"))
    assert os.getcwd() == "/"


async def test_children_get_only_fds_0_to_2_and_default_signal_state() -> None:
    os.set_inheritable(os.open("/dev/null", os.O_RDONLY), True)  # as a careless parent might
    process.close_inherited_fds_on_exec()
    child = process.spawn(request("", argv=["/bin/sleep", "30"], close_stdin=False))
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


async def test_kill_tree_takes_the_group_and_descendants_that_left_it() -> None:
    reaper = process.Reaper()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            child = process.spawn(
                request("sleep 100 & setsid sleep 100 & echo ready; wait", close_stdin=True)
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
    child = process.spawn(request("exit 7"))
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
    orphan = process.spawn(request("exit 3"))
    close_fds(orphan)
    while reaper.sequence == 0:
        reaper.reap_all()
        await trio.sleep(0.01)
    # A later spawn that happened to get the same pid must not receive that status.
    statuses: list[ExitStatus] = []
    reaper.watch(orphan, statuses.append, since=reaper.sequence)
    assert statuses == [] and reaper.watched == 1
    assert reaper.orphans_reaped == 1
