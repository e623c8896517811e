"""Spawning: exit codes of exec failures, spawn failures, child hygiene, PTYs (real processes)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import signal
import stat
import tempfile
import time

import psutil
import pytest
import trio

from sandboxd.core.errors import InvalidRequest, SpawnFailed
from sandboxd.core.session import ExitStatus
from sandboxd.runtime import process, spawn
from tests.conftest import OtherUser
from tests.runtime.children import (
    ENV,
    Terminal,
    assert_clean_start,
    close_fds,
    run_to_exit,
    shell_request,
)


async def test_exec_errors_inside_the_shell_are_126_and_127(tmp_path: pathlib.Path) -> None:
    not_executable = tmp_path / "data.txt"
    not_executable.write_text("just data")
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            missing, _ = await run_to_exit(reaper, shell_request("/no/such/program"))
            not_exec, _ = await run_to_exit(reaper, shell_request(str(not_executable)))
            nursery.cancel_scope.cancel()
    assert (missing.code, not_exec.code) == (127, 126)


def test_a_missing_shell_or_work_dir_or_user_is_a_spawn_failure(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")  # the daemon's own cwd (cli.py), which spawns step out of and back to
    with pytest.raises(SpawnFailed, match="cannot run"):
        # the work dir exists, so the spawn is already inside it when the exec fails
        spawn.spawn(shell_request("true", argv=["/no/shell", "-c", "true"], cwd=str(tmp_path)))
    assert os.getcwd() == "/"  # the daemon's own cwd is restored after a failed exec
    with pytest.raises(SpawnFailed, match="work dir"):
        spawn.spawn(shell_request("true", cwd="/no/such/dir"))
    with pytest.raises(SpawnFailed, match="unknown user"):
        spawn.spawn(shell_request("true", user="no-such-user-x"))
    with pytest.raises(InvalidRequest):
        spawn.spawn(shell_request("true", user=":0"))
    assert os.getcwd() == "/"


#: A command too long for one argument (Linux: 128 KiB), so it goes through a loader.
LONG_PREFIX = ": " + "x" * (200 * 1024) + "\n"


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
@pytest.mark.parametrize("as_other_user", [False, True], ids=["own-user", "other-user"])
async def test_children_get_only_fds_0_to_2_and_default_signal_state(
    as_other_user: bool, pty: bool, long: bool, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue("other_user").name if as_other_user else None
    os.set_inheritable(os.open("/dev/null", os.O_RDONLY), True)  # as a careless parent might
    spawn.close_inherited_fds_on_exec()
    command = (LONG_PREFIX if long else "") + "exec /bin/sleep 30"
    # As a daemon started by nohup, or from a shell that blocked a signal, might have them.
    previous_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        child = spawn.spawn(shell_request(command, close_stdin=False, pty=pty, user=user))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        signal.signal(signal.SIGQUIT, previous_quit)
    try:
        # posix_spawn returns after the exec, but sleep briefly opens files of its own
        # while it starts (locale data): look once it sits in its nanosleep.
        deadline = time.monotonic() + 10
        while "sleep" not in pathlib.Path(f"/proc/{child.pid}/wchan").read_text():
            assert time.monotonic() < deadline, "sleep never went to sleep"
            time.sleep(0.005)
        # Signals 1-31 all at their default, SIGPIPE included (Python ignores it in the
        # daemon).
        assert_clean_start(child.pid)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        os.waitpid(child.pid, 0)  # noqa: ASYNC222 - no reaper runs in this test
        close_fds(child)


async def test_a_broken_pipe_kills_quietly_as_in_a_terminal() -> None:
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            status, out = await run_to_exit(reaper, shell_request("yes 2>&1 | head -1"))
            nursery.cancel_scope.cancel()
    assert (status.code, out) == (0, b"y\n")


async def test_a_pty_child_has_the_terminal_as_its_controlling_tty_at_the_set_size() -> None:
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            script = "tty; stty size; ps -o tty= -p $$"
            status, out = await run_to_exit(
                reaper, shell_request(script, pty=True, cols=132, rows=43)
            )
            nursery.cancel_scope.cancel()
    tty, size, ctty = out.decode().split("\r\n")[:3]
    assert tty.startswith("/dev/pts/") and size == "43 132"
    assert ctty.strip() == tty.removeprefix("/dev/")
    assert status.code == 0


async def test_a_pty_command_run_as_another_user_has_its_terminal_and_its_ids(
    other_user: OtherUser,
) -> None:
    script = "tty; ps -o tty=,sess=,pgid=,tpgid= -p $$; echo $$; id -u; id -g; id -G"
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            status, out = await run_to_exit(
                reaper, shell_request(script, pty=True, user=other_user.name)
            )
            nursery.cancel_scope.cancel()
    tty, ps_line, pid, uid, gid, groups = out.decode().split("\r\n")[:6]
    assert tty.startswith("/dev/pts/"), out
    ctty, session, group, foreground = ps_line.split()
    # Its own session, led by the shell, whose group is the terminal's foreground.
    assert (ctty, session, group, foreground) == (tty.removeprefix("/dev/"), pid, pid, pid)
    assert (int(uid), int(gid)) == (other_user.uid, other_user.gid)
    assert {int(g) for g in groups.split()} == other_user.groups
    assert status.code == 0


async def test_a_pty_commands_output_passes_through_a_relay_outside_its_session_and_tree() -> None:
    reaper = process.Reaper()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            child = spawn.spawn(shell_request("read line; echo got=$line", pty=True))
            statuses: list[ExitStatus] = []
            reaper.watch(child, statuses.append)
            assert child.relays is not None and child.terminal_fd is not None
            pid, no_input_relay = child.relays
            assert no_input_relay == 0  # the daemon writes the master itself
            gone: list[int] = []
            reaper.watch(spawn.Child(pid, -1, None, None, False), lambda _s: gone.append(pid))
            descendants = {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
            relay_program = spawn.relay_program()
            assert relay_program is not None
            relay = psutil.Process(pid)
            assert relay.cmdline() == [spawn.RELAY_NAME]
            assert relay.exe() == os.path.realpath(relay_program) == str(spawn.HELPER_PROGRAM)
            # Named by the fd it was exec'd by: never taken for the spawner helper.
            assert pathlib.Path(f"/proc/{pid}/comm").read_text().strip().isdigit()
            assert relay.ppid() == os.getpid() and pid not in descendants
            assert os.getsid(pid) == pid  # a session of its own: no controlling terminal
            assert relay.environ() == {}
            # The daemon reads a pipe, and writes (and resizes) the master.
            assert stat.S_ISFIFO(os.fstat(child.output_fd).st_mode)
            assert child.input_fd is not None and stat.S_ISCHR(os.fstat(child.input_fd).st_mode)
            assert stat.S_ISCHR(os.fstat(child.terminal_fd).st_mode)
            # Written without blocking, as the daemon does: the relay shares the master's
            # open file (O_NONBLOCK and all) and waits instead of giving up at EAGAIN.
            os.set_blocking(child.input_fd, False)
            term = Terminal(child)
            await trio.sleep(0.2)  # (the relay meets EAGAIN while nothing is typed)
            term.type(b"hello\n")
            await term.expect(b"got=hello\r\n")
            while not statuses:
                await trio.sleep(0.01)
            # The relay ends by itself once the slave is closed, after all it read.
            assert await term.stream.receive_some(65536) == b""
            while pid not in gone:
                await trio.sleep(0.01)
            await term.stream.aclose()
            os.close(child.input_fd)
            os.close(child.terminal_fd)
            nursery.cancel_scope.cancel()
    assert statuses[0].code == 0


async def test_without_the_helper_a_pty_command_is_read_straight_from_the_master(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spawn, "relay_program", lambda: None)
    reaper = process.Reaper()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            children_before = {p.pid for p in psutil.Process().children()}
            request = shell_request("tty; stty size", pty=True, cols=100, rows=30)
            child = spawn.spawn(request)
            assert child.relays is None and child.terminal_fd is None
            assert stat.S_ISCHR(os.fstat(child.output_fd).st_mode)
            new = {p.pid for p in psutil.Process().children()} - children_before
            assert new == {child.pid}  # no relay started
            os.close(child.output_fd)
            assert child.input_fd is not None
            os.close(child.input_fd)
            status, out = await run_to_exit(reaper, request)
            nursery.cancel_scope.cancel()
    tty, size = out.decode().split("\r\n")[:2]
    assert tty.startswith("/dev/pts/") and size == "30 100" and status.code == 0


@pytest.mark.parametrize("as_other_user", [False, True], ids=["own-user", "other-user"])
async def test_ctrl_c_and_job_control_work_in_an_interactive_bash_on_the_pty(
    as_other_user: bool, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue("other_user").name if as_other_user else None
    env = {**ENV, "PS1": "$ ", "TERM": "dumb"}
    reaper = process.Reaper()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            child = spawn.spawn(
                shell_request(
                    "export PS1='$ '; exec bash --norc --noprofile -i",
                    pty=True,
                    user=user,
                    env=env,
                    close_stdin=False,
                )
            )
            statuses: list[ExitStatus] = []
            reaper.watch(child, statuses.append)
            term = Terminal(child)
            started = await term.expect(b"$ ")
            term.type(b"sleep 30\n")
            while not [p for p in psutil.Process(child.pid).children() if p.name() == "sleep"]:
                await trio.sleep(0.02)
            term.type(b"\x03")
            await term.expect(b"$ ")
            term.type(b"echo rc=$(($? + 0))\n")
            await term.expect(b"rc=130")
            term.type(b"sleep 30 &\n")
            await term.expect(b"$ ")
            term.type(b"jobs; kill %1; wait; echo jobs-$((6 * 7))\n")
            jobs = await term.expect(b"jobs-42")
            term.type(b"exit 5\n")
            while not statuses:
                await trio.sleep(0.02)
            await term.stream.aclose()
            assert child.input_fd is not None
            os.close(child.input_fd)
            nursery.cancel_scope.cancel()
    assert b"no job control" not in started and b"cannot set terminal" not in started, started
    assert b"Running" in jobs and b"sleep 30 &" in jobs, jobs
    assert statuses[0].code == 5


def heredoc_command(size: int, path: pathlib.Path) -> tuple[str, str]:
    """A command of exactly ``size`` bytes that writes a file by a heredoc, prints what
    ``bash -c`` would give it as ``$0``/``$#``, echoes a line of stdin and exits 3; and the
    sha256 the file must have."""
    head = f"cat > {path} <<'EOF'\n"
    tail = f'EOF\nsha256sum < {path}; echo "$0|$#|$*"; read -r line; echo "in:$line"; exit 3\n'
    body_size = size - len(head) - len(tail)
    line = "0123456789abcdef" * 4 + "\n"
    body = (line * (body_size // len(line) + 1))[: body_size - 1] + "\n"
    command = head + body + tail
    assert len(command.encode()) == size
    return command, hashlib.sha256(body.encode()).hexdigest()


@pytest.mark.parametrize(
    "size", [127 * 1024, 128 * 1024, 1024 * 1024, 7 * 1024 * 1024], ids=["127K", "128K", "1M", "7M"]
)
@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
@pytest.mark.parametrize("as_other_user", [False, True], ids=["own-user", "other-user"])
async def test_a_command_of_any_size_runs_as_bash_c_would_run_it(
    size: int,
    pty: bool,
    as_other_user: bool,
    request: pytest.FixtureRequest,
) -> None:
    user = request.getfixturevalue("other_user").name if as_other_user else None
    shared = pathlib.Path(tempfile.mkdtemp())  # pytest's own folders are 0700
    shared.chmod(0o777)
    command, digest = heredoc_command(size, shared / "written.txt")
    reaper = process.Reaper()
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(reaper.run)
                status, out = await run_to_exit(
                    reaper,
                    shell_request(command, pty=pty, user=user, close_stdin=False),
                    stdin=b"typed\n",
                )
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(shared)
    lines = out.decode().replace("\r\n", "\n").splitlines()
    if pty:
        # The terminal echoes the input when it is written, which under load can be after
        # the command's first line (not before the command read it).
        assert "typed" in lines and lines.index("typed") < lines.index("in:typed"), lines
        lines.remove("typed")
    assert lines == [f"{digest}  -", "/bin/bash|0|", "in:typed"], lines
    assert status.code == 3


async def test_a_long_command_sees_what_a_short_one_sees() -> None:
    probe = (
        'printf "%s|" "$0" "$#" "$_" "$LINENO" "${BASH_EXECUTION_STRING: -9}"; ls /proc/$$/fd;'
        " set | grep -c __sandboxd_comman[d]; f() { return 4; }; f; echo $?; (exit 2)"
    )
    pad = "#" + "x" * 140_000 + "\n"
    spawn.close_inherited_fds_on_exec()
    reaper = process.Reaper()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            env = {**ENV, "_": "/usr/bin/env"}
            short, short_out = await run_to_exit(reaper, shell_request("\n" + probe, env=env))
            long, long_out = await run_to_exit(reaper, shell_request(pad + probe, env=env))
            nursery.cancel_scope.cancel()
    # $0, $#, $_, $LINENO, BASH_EXECUTION_STRING, the fds, no loader variable, status.
    assert short_out.decode() == "/bin/bash|0|/usr/bin/env|2| (exit 2)|0\n1\n2\n0\n4\n"
    assert (long.code, long_out) == (short.code, short_out) == (2, short_out)


async def test_without_per_thread_credentials_another_user_still_runs_any_command(
    other_user: OtherUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Architectures whose system call numbers identity.py does not know use Popen.
    monkeypatch.setattr(spawn.identity, "THREAD_CREDENTIALS", False)
    spawn.close_inherited_fds_on_exec()
    reaper = process.Reaper()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            status, out = await run_to_exit(
                reaper,
                shell_request(
                    LONG_PREFIX + "id -u; id -G; ls /proc/$$/fd; exit 4", user=other_user.name
                ),
            )
            nursery.cancel_scope.cancel()
    uid, groups, *fds = out.decode().splitlines()
    assert int(uid) == other_user.uid and {int(g) for g in groups.split()} == other_user.groups
    assert fds == ["0", "1", "2"] and status.code == 4


async def test_concurrent_spawns_for_two_users_never_cross_identities(
    other_user: OtherUser,
) -> None:
    # Spawns run in worker threads; one holding the other user's credentials must never
    # leak them into a spawn for the daemon's own user, nor keep them afterwards.
    reaper = process.Reaper()
    outputs: dict[int, bytes] = {}

    async def one(index: int) -> None:
        user = other_user.name if index % 2 else None
        child = await trio.to_thread.run_sync(spawn.spawn, shell_request("id -u", user=user))
        statuses: list[ExitStatus] = []
        reaper.watch(child, statuses.append)
        stream = trio.lowlevel.FdStream(child.output_fd)
        data = b""
        while chunk := await stream.receive_some(100):
            data += chunk
        await stream.aclose()
        assert child.error_fd is not None
        os.close(child.error_fd)
        outputs[index] = data

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            async with trio.open_nursery() as spawns:
                for index in range(200):
                    spawns.start_soon(one, index)
            nursery.cancel_scope.cancel()
    wrong = {
        i: out
        for i, out in outputs.items()
        if out != f"{other_user.uid if i % 2 else 0}\n".encode()
    }
    assert len(outputs) == 200 and wrong == {}
    assert (os.getresuid(), os.getresgid()) == ((0, 0, 0), (0, 0, 0))


def test_own_peak_rss_is_vmhwm_of_this_process_on_every_call() -> None:
    def vmhwm() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    assert spawn.own_peak_rss_kib() == vmhwm()
    grown = bytearray(64 * 1024 * 1024)  # touched: the high-water mark rises
    grown[::4096] = b"x" * len(grown[::4096])
    assert spawn.own_peak_rss_kib() == vmhwm() >= 64 * 1024  # the kept fd reads afresh
    del grown


def test_stray_relays_are_killed_and_their_terminal_hangs_up() -> None:
    # What a fresh start after a failed handover does (runtime/resume.py): no session owns
    # the relays any more. The command's terminal then hangs up once the master closes.
    child = spawn.spawn(shell_request("read line", pty=True, close_stdin=False))
    assert child.relays is not None and child.terminal_fd is not None
    try:
        assert spawn.kill_stray_relays() == 1
        _, status = os.waitpid(child.relays[0], 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        close_fds(child)  # as the fresh start closes every fd it inherited
        # The hangup ends the shell: by its SIGHUP, or by its read failing first (EIO).
        _, status = os.waitpid(child.pid, 0)
        hung_up = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP
        assert hung_up or os.waitstatus_to_exitcode(status) == 1, status
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
