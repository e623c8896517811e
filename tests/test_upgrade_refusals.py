"""Live upgrade (issue 11): an upgrade that must not happen leaves everything as it was.

A damaged state blob (the test-only fault hooks of UPGRADE_CONTRACT.md) and a candidate
that cannot start are refused before the swap: 409, ``last_upgrade.result == "refused"``,
the generation unchanged, and a command streaming meanwhile is never even disconnected.
A candidate that fails after the exec is rolled back: its client is closed with 1001 and
reattaches, and still gets every byte. A second trigger during an upgrade makes no second
generation step.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.sdk.conftest import DaemonProcess
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
    wait_last_upgrade,
)

DAMAGES = ["corrupt", "truncate", "newer-schema", "other-pid"]


async def _thread(function: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(function, *args)


async def _intact(daemon: DaemonProcess, follower: Follower, command: Command) -> None:
    """The command's stream, as followed and as replayed from 0, is exact."""
    assert follower.command_id is not None
    wrong = mismatches(command, follower.streams, follower.exit_code, "client")
    ws_url = f"ws://{daemon.address}/execute/ws"
    replayed, code = await replay(ws_url, follower.command_id)
    wrong += mismatches(command, replayed, code, "replay")
    assert wrong == [], wrong


def _artifact(tmp_path: Path, name: str, script: str) -> bytes:
    path = tmp_path / name
    path.write_text(script)
    return path.read_bytes()


@pytest.mark.parametrize("damage", DAMAGES)
async def test_a_damaged_state_blob_is_refused_before_the_swap_and_nothing_changes(
    damage: str, tmp_path: Path
) -> None:
    command = loop_command("r", tmp_path / "stop")
    with upgrade_daemon(fault=damage, allow_errors=True) as daemon, trio.fail_after(90):
        pid = daemon.process.pid
        follower = Follower(f"ws://{daemon.address}/execute/ws", command)
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run)
            await trio.sleep(0.3)
            status, body = await _thread(post_upgrade, daemon.address)
            assert (status, body.get("error")) == (409, "UpgradeRefused"), (status, body)
            assert body["message"], body
            health = await _thread(healthz, daemon.address)
            assert (health["pid"], health["generation"]) == (pid, 0), health
            last = health["last_upgrade"]
            assert last["result"] == "refused" and last["reason"], last
            # the signal takes the same path
            first_at = last["at"]
            os.kill(pid, signal.SIGUSR2)
            health = await _thread(healthz, daemon.address)
            while health["last_upgrade"]["at"] <= first_at:
                await trio.sleep(0.05)
                health = await _thread(healthz, daemon.address)
            assert health["last_upgrade"]["result"] == "refused", health
            assert (health["pid"], health["generation"]) == (pid, 0), health
            await trio.sleep(0.3)
            (tmp_path / "stop").touch()
        assert follower.closes == [], "a refused upgrade disconnected a client"
        await _intact(daemon, follower, command)


async def test_the_same_scenario_with_an_intact_blob_upgrades(tmp_path: Path) -> None:
    """The positive control of the refusal tests above: without a damage, the same
    session and the same trigger make an upgrade (else those refusals prove nothing)."""
    command = loop_command("r", tmp_path / "stop")
    with upgrade_daemon() as daemon, trio.fail_after(90):
        follower = Follower(f"ws://{daemon.address}/execute/ws", command)
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run)
            await trio.sleep(0.3)
            status, body = await _thread(post_upgrade, daemon.address)
            assert status == 202, (status, body)
            health = await _thread(wait_generation, daemon.address, 1)
            assert health["pid"] == daemon.process.pid
            await trio.sleep(0.3)
            (tmp_path / "stop").touch()
        assert follower.closes == [1001], follower.closes
        await _intact(daemon, follower, command)


async def test_a_candidate_that_cannot_start_is_refused_with_its_stderr(tmp_path: Path) -> None:
    command = loop_command("c", tmp_path / "stop")
    broken = _artifact(tmp_path, "broken", "#!/bin/sh\necho 'no-such-runtime-4711' >&2\nexit 1\n")
    with upgrade_daemon(allow_errors=True) as daemon, trio.fail_after(90):
        follower = Follower(f"ws://{daemon.address}/execute/ws", command)
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run)
            status, body = await _thread(post_upgrade, daemon.address, broken)
            assert (status, body.get("error")) == (409, "UpgradeRefused"), (status, body)
            assert "no-such-runtime-4711" in body["message"], body
            health = await _thread(healthz, daemon.address)
            assert health["generation"] == 0 and health["pid"] == daemon.process.pid
            assert health["last_upgrade"]["result"] == "refused", health
            # the daemon still upgrades to what is installed
            status, body = await _thread(post_upgrade, daemon.address)
            assert status == 202, body
            await _thread(wait_generation, daemon.address, 1)
            (tmp_path / "stop").touch()
        assert follower.closes == [1001], follower.closes  # only the real upgrade closed it
        await _intact(daemon, follower, command)


async def _rolled_back(daemon: DaemonProcess, command: Command, stop: Path, body: bytes) -> None:
    pid = daemon.process.pid
    follower = Follower(f"ws://{daemon.address}/execute/ws", command)
    async with trio.open_nursery() as nursery:
        await nursery.start(follower.run)
        await trio.sleep(0.3)
        since = time.time()
        status, answer = await _thread(post_upgrade, daemon.address, body)
        assert status == 202, (status, answer)  # the swap was committed: the failure is later
        health = await _thread(wait_last_upgrade, daemon.address, since)
        assert health["last_upgrade"]["result"] == "rolled_back", health
        assert health["last_upgrade"]["reason"], health
        assert (health["pid"], health["generation"]) == (pid, 0), health
        assert health["version"] == health["last_upgrade"]["from_version"], health
        await trio.sleep(0.5)
        stop.touch()
    assert follower.closes == [1001], follower.closes
    await _intact(daemon, follower, command)


async def test_a_blob_the_new_image_refuses_after_the_exec_is_rolled_back(tmp_path: Path) -> None:
    command = loop_command("b", tmp_path / "stop")
    with (
        upgrade_daemon(fault="skip-preflight,corrupt", allow_errors=True) as daemon,
        trio.fail_after(90),
    ):
        await _rolled_back(daemon, command, tmp_path / "stop", b"")


async def test_a_new_image_that_fails_while_resuming_is_rolled_back(tmp_path: Path) -> None:
    command = loop_command("f", tmp_path / "stop")
    wrapper = _artifact(
        tmp_path,
        "fails-resume",
        "#!/bin/sh\nexport SANDBOXD_TEST_UPGRADE_FAULT=fail-resume\n"
        f'exec {sys.executable} -m sandboxd "$@"\n',
    )
    with upgrade_daemon(allow_errors=True) as daemon, trio.fail_after(90):
        await _rolled_back(daemon, command, tmp_path / "stop", wrapper)
        # the image that came back upgrades normally
        since = time.time()
        status, _ = await _thread(post_upgrade, daemon.address)
        assert status == 202
        health = await _thread(wait_generation, daemon.address, 1, 60.0, since)
        assert health["pid"] == daemon.process.pid


async def test_triggers_during_an_upgrade_make_one_generation_step(tmp_path: Path) -> None:
    with upgrade_daemon() as daemon, trio.fail_after(90):
        answers: list[tuple[int, dict[str, Any]]] = []

        async def post() -> None:
            answers.append(await _thread(post_upgrade, daemon.address))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post)
            nursery.start_soon(post)
            await trio.sleep(0.05)
            os.kill(daemon.process.pid, signal.SIGUSR2)  # lands during the pre-flight
        statuses = sorted(status for status, _ in answers)
        assert statuses in ([202, 202], [202, 409]), answers
        for status, body in answers:
            if status == 202:
                assert body["generation"] == 1, body  # a coalesced trigger names the same step
            else:
                assert body["error"] == "UpgradeRefused", body
        await _thread(wait_generation, daemon.address, 1)
        await trio.sleep(3)  # nothing queued starts a second upgrade later
        health = await _thread(healthz, daemon.address)
        assert health["generation"] == 1, health
        assert health["last_upgrade"]["result"] == "ok", health
