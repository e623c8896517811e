"""sandboxd as PID 1 (inside ``unshare --pid --fork --mount-proc``) and as an ordinary
child process: orphans, signals, and commands' escapees (design.md, "Processes")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest
import trio

from tests.helpers import exec_socket, run_command

UNSHARE = shutil.which("unshare")


@dataclass
class Spawned:
    """A sandboxd process; ``daemon`` is sandboxd itself (not unshare). Its log lines are
    drained into ``logs`` (an undrained pipe would block the daemon once full)."""

    launcher: subprocess.Popen[str]
    daemon: psutil.Process
    address: str
    logs: list[dict[str, object]] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def ws(self) -> str:
        return f"ws://{self.address}/execute/ws"


def _launch(as_pid1: bool) -> Spawned:
    argv = [sys.executable, "-m", "sandboxd", "--listen", "127.0.0.1:0", "--stop-grace", "1"]
    if as_pid1:
        assert UNSHARE is not None
        argv = [UNSHARE, "--pid", "--fork", "--mount-proc", *argv]
    launcher = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert launcher.stderr is not None
    first = json.loads(launcher.stderr.readline())
    assert first["msg"] == "listening", first
    daemon = psutil.Process(launcher.pid)
    if as_pid1:
        (daemon,) = daemon.children()
    spawned = Spawned(launcher, daemon, first["address"])

    def drain() -> None:
        assert launcher.stderr is not None
        for line in launcher.stderr:
            if line.startswith("{"):
                spawned.logs.append(json.loads(line))

    spawned.reader = threading.Thread(target=drain, daemon=True)
    spawned.reader.start()
    return spawned


def _finish(spawned: Spawned) -> tuple[int, list[dict[str, object]]]:
    code = spawned.launcher.wait(timeout=30)
    assert spawned.reader is not None
    spawned.reader.join(timeout=10)
    return code, spawned.logs


@pytest.fixture(params=["pid1", "child"])
def spawned(request: pytest.FixtureRequest) -> Iterator[Spawned]:
    if request.param == "pid1" and (UNSHARE is None or os.geteuid() != 0):
        pytest.skip("needs root and unshare")
    running = _launch(request.param == "pid1")
    try:
        yield running
    finally:
        if running.launcher.poll() is None:
            running.daemon.send_signal(signal.SIGKILL)
            running.launcher.wait(timeout=30)
        if running.reader is not None:
            running.reader.join(timeout=10)
        if running.launcher.stderr is not None:
            running.launcher.stderr.close()


def zombies(process: psutil.Process) -> list[psutil.Process]:
    return [p for p in process.children() if p.status() == psutil.STATUS_ZOMBIE]


async def test_orphans_of_a_command_are_reaped(spawned: Spawned) -> None:
    with trio.fail_after(30):
        t = await run_command(
            spawned.ws,
            "for i in $(seq 100); do setsid sleep $((i % 3 + 1)) & done; echo started",
        )
        assert t.terminal["exit_code"] == 0
        deadline = trio.current_time() + 8
        while trio.current_time() < deadline:
            children = spawned.daemon.children()
            if not children:
                break
            await trio.sleep(0.2)
    assert spawned.daemon.children() == [] and zombies(spawned.daemon) == []


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_stop_signals_from_outside_end_the_daemon_gracefully(
    spawned: Spawned, signo: int
) -> None:
    with trio.fail_after(30):
        async with exec_socket(spawned.ws) as client:
            await client.send(type="execute", command="sleep 1000")
            await client.recv_until("started")
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
            await client.send(
                type="execute",
                command="setsid sleep 1000 & nohup sleep 1000 >/dev/null 2>&1 & "
                "(setsid sh -c 'sleep 1000 & echo $!' &) ; echo ready; sleep 1000",
            )
            await client.recv_until("started")
            while "ready" not in client.transcript.text("stdout"):
                await client.recv()
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
