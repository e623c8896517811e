"""sandboxd as PID 1 (inside ``unshare --pid --fork --mount-proc``) and as an ordinary
child process: orphans, signals, and commands' escapees (design.md, "Processes")."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
import trio

from tests.helpers import command_processes, exec_socket, is_spawner_helper, run_command
from tests.sdk.conftest import DaemonProcess, start_daemon

UNSHARE = shutil.which("unshare")


@dataclass
class Spawned:
    """A sandboxd process; ``daemon`` is sandboxd itself (not unshare)."""

    handle: DaemonProcess
    daemon: psutil.Process

    @property
    def ws(self) -> str:
        return f"ws://{self.handle.address}/execute/ws"


def _launch(as_pid1: bool) -> Spawned:
    prefix = [UNSHARE, "--pid", "--fork", "--mount-proc"] if as_pid1 and UNSHARE else []
    handle = start_daemon("--stop-grace", "1", launcher=prefix)
    daemon = psutil.Process(handle.process.pid)
    if as_pid1:
        (daemon,) = daemon.children()
    return Spawned(handle, daemon)


def _finish(spawned: Spawned) -> tuple[int, list[dict[str, object]]]:
    """Wait for the daemon to end by itself; its exit code and every log line."""
    handle = spawned.handle
    code = handle.process.wait(timeout=30)
    if handle.reader is not None:
        handle.reader.join(timeout=10)
    return code, handle.logs


@pytest.fixture(params=["pid1", "child"])
def spawned(request: pytest.FixtureRequest) -> Iterator[Spawned]:
    if request.param == "pid1" and (UNSHARE is None or os.geteuid() != 0):
        pytest.skip("needs root and unshare")
    running = _launch(request.param == "pid1")
    try:
        yield running
    finally:
        process = running.handle.process
        if process.poll() is None:
            running.daemon.send_signal(signal.SIGKILL)
        _finish(running)
        if process.stderr is not None:
            process.stderr.close()


def zombies(process: psutil.Process) -> list[psutil.Process]:
    return [p for p in command_processes(process) if p.status() == psutil.STATUS_ZOMBIE]


async def test_commands_are_the_daemons_own_children_though_its_spawner_helper_starts_them(
    spawned: Spawned,
) -> None:
    with trio.fail_after(30):
        t = await run_command(spawned.ws, "echo $PPID; ps -o sid= -p $$; echo $$")
        (helper,) = [p for p in spawned.daemon.children() if is_spawner_helper(p)]
        helper.kill()
        while helper.is_running():  # (a zombie until the daemon reaps it)
            await trio.sleep(0.02)
        after = await run_command(spawned.ws, "echo $PPID")  # now spawned on the loop
    parent, session, pid = t.text("stdout").split()
    inside = spawned.daemon.ppid() != os.getpid()  # (pid 1 in its own namespace)
    assert int(parent) == (1 if inside else spawned.daemon.pid)
    assert session == pid  # a session of its own
    assert t.terminal["exit_code"] == 0
    assert int(after.text("stdout")) == int(parent) and after.terminal["exit_code"] == 0
    assert [p for p in spawned.daemon.children() if is_spawner_helper(p)] == []


async def test_orphans_of_a_command_are_reaped(spawned: Spawned) -> None:
    with trio.fail_after(30):
        t = await run_command(
            spawned.ws,
            "for i in $(seq 100); do setsid sleep $((i % 3 + 1)) & done; echo started",
        )
        assert t.terminal["exit_code"] == 0
        deadline = trio.current_time() + 8
        while trio.current_time() < deadline:
            children = command_processes(spawned.daemon)
            if not children:
                break
            await trio.sleep(0.2)
    assert command_processes(spawned.daemon) == [] and zombies(spawned.daemon) == []


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_stop_signals_from_outside_end_the_daemon_gracefully(
    spawned: Spawned, signo: int
) -> None:
    with trio.fail_after(30):
        async with exec_socket(spawned.ws) as client:
            await client.start(command="sleep 1000")
            spawned.daemon.send_signal(signo)
            t = await client.collect()
    code, logs = await trio.to_thread.run_sync(_finish, spawned)
    assert t.terminal["exit_code"] == 128 + signal.SIGTERM  # commands get SIGTERM first
    assert code == 0 and logs[-1]["msg"] == "stopped"


async def test_a_stop_signal_from_inside_the_namespace_works_too(spawned: Spawned) -> None:
    with trio.fail_after(30):
        await run_command(
            spawned.ws,
            f"kill -TERM {'1' if spawned.daemon.ppid() != os.getpid() else spawned.daemon.pid}",
        )
    code, logs = await trio.to_thread.run_sync(_finish, spawned)
    assert code == 0 and logs[-1]["msg"] == "stopped"


async def test_job_control_signals_never_stop_the_daemon(spawned: Spawned) -> None:
    for signo in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        spawned.daemon.send_signal(signo)
    time.sleep(0.2)
    assert spawned.daemon.status() != psutil.STATUS_STOPPED
    with trio.fail_after(10):
        t = await run_command(spawned.ws, "echo alive")
    assert t.text("stdout") == "alive\n"


async def test_escapees_are_gone_after_a_kill(spawned: Spawned) -> None:
    with trio.fail_after(30):
        async with exec_socket(spawned.ws) as client:
            await client.start(
                command="setsid sleep 1000 & nohup sleep 1000 >/dev/null 2>&1 & "
                "(setsid sh -c 'sleep 1000 & echo $!' &) ; echo ready; sleep 1000"
            )
            await client.recv_until_text("stdout", "ready")
            await trio.sleep(0.3)
            command_id = client.transcript.frames[0]["command_id"]
            sleepers = [
                p
                for p in psutil.process_iter(["name", "environ"])
                if p.info["name"] == "sleep"
                and (p.info["environ"] or {}).get("SANDBOXD_COMMAND_ID") == command_id
            ]
            assert len(sleepers) >= 4
            await client.send(type="kill")
            t = await client.collect()
        assert t.terminal["exit_code"] == 137
        deadline = trio.current_time() + 5
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sleepers):
            assert trio.current_time() < deadline, [p.pid for p in sleepers if p.is_running()]
            await trio.sleep(0.05)


def _tagged_sleepers(command_id: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["name", "environ"])
        if p.info["name"] == "sleep"
        and (p.info["environ"] or {}).get("SANDBOXD_COMMAND_ID") == command_id
    ]


async def test_a_stop_kills_a_command_ignoring_term_after_the_grace_and_its_escapees(
    spawned: Spawned,
) -> None:
    # TERM is ignored by the command and everything it starts (SIG_IGN survives exec),
    # the escapees included: only the SIGKILL after --stop-grace (1 s here) ends them.
    with trio.fail_after(30):
        async with exec_socket(spawned.ws) as client:
            await client.start(
                command="trap '' TERM; setsid sleep 1000 & "
                "(setsid sh -c 'sleep 1000 & echo $!' &) ; echo ready; sleep 1000"
            )
            await client.recv_until_text("stdout", "ready")
            await trio.sleep(0.3)
            sleepers = _tagged_sleepers(client.transcript.frames[0]["command_id"])
            # the command's own sleep, and two in sessions of their own (escapees)
            assert len(sleepers) == 3 and len({os.getsid(p.pid) for p in sleepers}) == 3
            signalled = trio.current_time()
            spawned.daemon.send_signal(signal.SIGTERM)
            exit_frame = await client.recv_until("exit")
            waited = trio.current_time() - signalled
            alive = [p.pid for p in sleepers if p.is_running() and p.status() != "zombie"]
            t = await client.collect()
    code, _ = await trio.to_thread.run_sync(_finish, spawned)
    assert exit_frame["exit_code"] == 137 and exit_frame["signal"] == "KILL"
    assert exit_frame["reason"] == "shutdown"
    assert waited >= 0.9  # not before --stop-grace
    assert alive == []
    assert t.close_code == 1000 and code == 0


async def test_500_exit_statuses_stay_exact_while_orphans_churn(spawned: Spawned) -> None:
    import random

    rng = random.Random(4)
    plan: list[tuple[str, int]] = []
    for i in range(500):
        orphan = f"(setsid sleep 0.{i % 7 + 1} >/dev/null 2>&1 &); "  # an orphan to reap
        if rng.random() < 0.3:
            signo = rng.choice([signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL])
            # (not `sleep & kill`: bash starts background jobs with INT and QUIT ignored)
            plan.append((orphan + f"exec sh -c 'kill -{int(signo)} $$'", 128 + signo))
        else:
            code = rng.randrange(256)
            plan.append((orphan + f"exit {code}", code))
    results: dict[int, int] = {}

    async def one(index: int, command: str) -> None:
        t = await run_command(spawned.ws, command, timeout_seconds=60)
        results[index] = t.terminal["exit_code"]

    with trio.fail_after(120):
        limit = trio.CapacityLimiter(50)

        async def bounded(index: int, command: str) -> None:
            async with limit:
                await one(index, command)

        async with trio.open_nursery() as nursery:
            for index, (command, _) in enumerate(plan):
                nursery.start_soon(bounded, index, command)
    wrong = {i: (results[i], want) for i, (_, want) in enumerate(plan) if results[i] != want}
    assert wrong == {}
