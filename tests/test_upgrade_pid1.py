"""Live upgrade (issue 11) as PID 1 of a fresh PID namespace (``unshare --pid --fork
--mount-proc``, as in a container without an init): the daemon stays PID 1 across
upgrades, a streaming command stays byte-exact, orphans that end during a swap are reaped
by the new image, and a SIGTERM that lands in the exec window (the ``exec-window-sleep``
fault hook holds it open) ends in a graceful stop: the command ends with reason
``shutdown`` and the daemon exits 0. (For PID 1 a SIGTERM the new image dropped
would simply be ignored by the kernel, and the daemon would keep running.)
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from tests.helpers import command_processes
from tests.upgrade_clients import (
    Follower,
    replay,
)
from tests.upgrade_helpers import (
    Command,
    healthz,
    loop_command,
    mismatches,
    post_upgrade,
    upgrade_daemon,
    wait_generation,
    wait_no_zombies,
)

UNSHARE = shutil.which("unshare")
pytestmark = pytest.mark.skipif(
    UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare (CI has both)"
)
LAUNCHER = [UNSHARE or "unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]


async def _thread(function: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(function, *args)


async def test_pid_1_upgrades_in_place_reaps_orphans_and_stops_on_a_term_in_the_swap(
    tmp_path: Path,
) -> None:
    command = loop_command("n", tmp_path / "stop")
    orphans = Command(
        "orphans",
        "for i in 1 2 3; do setsid sleep 0.7 & done; echo spawned",
        0,
        stdout=b"spawned\n",
    )
    with (
        upgrade_daemon(fault="exec-window-sleep=1", launcher=LAUNCHER) as daemon,
        trio.fail_after(120),
    ):
        (init,) = psutil.Process(daemon.process.pid).children()
        ws_url = f"ws://{daemon.address}/execute/ws"
        health = await _thread(healthz, daemon.address)
        assert health["pid"] == 1, health
        stream = Follower(ws_url, command)
        async with trio.open_nursery() as nursery:
            await nursery.start(stream.run)
            orphaner = Follower(ws_url, orphans)
            await orphaner.run()
            assert orphaner.exit_code == 0
            # the sleeps are now PID 1's children; they end inside the first exec window
            os.kill(init.pid, signal.SIGUSR2)
            await _thread(wait_generation, daemon.address, 1)
            status, _ = await _thread(post_upgrade, daemon.address)
            assert status == 202
            health = await _thread(wait_generation, daemon.address, 2)
            assert health["pid"] == 1 and init.is_running(), health
            (tmp_path / "stop").touch()
        assert stream.command_id is not None
        wrong = mismatches(command, stream.streams, stream.exit_code, "client")
        wrong += mismatches(command, *await replay(ws_url, stream.command_id), "replay")
        assert wrong == [], wrong
        assert stream.closes == [1001, 1001], stream.closes
        assert await _thread(wait_no_zombies, init.pid) == []
        assert [p.name() for p in command_processes(init)] == []  # the orphans were reaped

        # SIGTERM inside the exec window of a third upgrade
        last = Follower(ws_url, Command("term", "while :; do echo tick; sleep 0.05; done", 0))
        async with trio.open_nursery() as nursery:
            await nursery.start(last.run)
            status, _ = await _thread(post_upgrade, daemon.address)
            assert status == 202
            while not last.closes:  # closed 1001 at the commit: the window is open now
                await trio.sleep(0.01)
            await trio.sleep(0.2)
            init.send_signal(signal.SIGTERM)
            code = await _thread(daemon.process.wait, 60)
            await trio.sleep(3)  # a terminal frame still on its way
            nursery.cancel_scope.cancel()
        assert code == 0, daemon.logs[-5:]
        # The new image acts on the pending TERM at once: the command ends with reason
        # shutdown. Its client, closed with 1001 by the upgrade, is refused (503) while
        # the daemon stops, so it does not get that exit frame (a documented gap).
        assert last.command_id is not None
        finished = [
            e
            for e in daemon.logs
            if e.get("msg") == "command finished" and e.get("command_id") == last.command_id
        ]
        assert [e.get("reason") for e in finished] == ["shutdown"], finished
        messages = [e.get("msg") for e in daemon.logs if e.get("logger") == "sandboxd"]
        assert messages[-1] == "stopped", messages[-5:]
