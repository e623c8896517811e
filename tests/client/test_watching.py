"""``ps``, ``logs``, ``kill`` and ``web``: they watch (``reconnect`` with ``"watch": true``)
and never count as an attached client."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

from tests.client.conftest import CLI, RunCli, cli_env
from tests.helpers import http_request
from tests.sdk.conftest import DaemonProcess


def _start(cli: RunCli, script: str, *options: str) -> str:
    command_id = uuid.uuid4().hex
    done = cli("exec", "-d", "--id", command_id, *options, "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    return command_id


def _wait_for(cli: RunCli, command_id: str, text: bytes) -> None:
    deadline = time.monotonic() + 20
    while text not in cli("logs", command_id).stdout:
        assert time.monotonic() < deadline, f"{text!r} never appeared"
        time.sleep(0.05)


def test_logs_n_3_prints_exactly_the_last_three_lines(cli: RunCli) -> None:
    command_id = _start(cli, "seq 1 1000; echo tail-err >&2; sleep 30")
    _wait_for(cli, command_id, b"1000\n")
    time.sleep(0.2)
    assert cli("logs", "-n", "3", "--stdout", command_id).stdout == b"998\n999\n1000\n"
    both = cli("logs", "-n", "3", command_id)
    assert both.stdout == b"999\n1000\n" and both.stderr == b"tail-err\n"
    assert cli("logs", "-n", "0", command_id).stdout == b""
    cli("kill", command_id)


def test_logs_without_n_prints_everything_so_far_and_returns(cli: RunCli) -> None:
    command_id = _start(cli, "seq 1 5; sleep 30")
    _wait_for(cli, command_id, b"5\n")
    done = cli("logs", command_id, timeout=20)
    assert (done.returncode, done.stdout) == (0, b"1\n2\n3\n4\n5\n")
    cli("kill", command_id)


async def test_ps_json_has_the_keys_of_sessions(cli: RunCli, sandboxd: DaemonProcess) -> None:
    command_id = _start(cli, "sleep 30")
    rows = json.loads(cli("ps", "--json").stdout)
    response = await http_request(sandboxd.address, "GET", "/sessions")
    sessions = response.json()["sessions"]
    [mine] = [r for r in rows if r["command_id"] == command_id]
    [theirs] = [r for r in sessions if r["command_id"] == command_id]
    assert mine.keys() == theirs.keys() and "watchers" in mine
    assert command_id.encode() in cli("ps").stdout
    cli("kill", command_id)
    assert command_id.encode() not in cli("ps").stdout
    assert command_id.encode() in cli("ps", "-a").stdout


def _row(cli: RunCli, command_id: str) -> dict[str, object]:
    rows = json.loads(cli("ps", "-a", "--json").stdout)
    [row] = [r for r in rows if r["command_id"] == command_id]
    assert isinstance(row, dict)
    return row


def _wait_finished(cli: RunCli, command_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while (row := _row(cli, command_id))["state"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return row


def test_kill_s_sends_the_signal_and_kill_kills_the_tree(cli: RunCli) -> None:
    signalled = _start(cli, "echo ready; sleep 30")
    _wait_for(cli, signalled, b"ready")
    assert cli("kill", "-s", "USR1", signalled).returncode == 0
    assert _wait_finished(cli, signalled)["exit_code"] == 138  # died of SIGUSR1
    killed = _start(cli, "sleep 30 & sleep 30; wait")
    assert cli("kill", killed).returncode == 0  # returns once the command has ended
    row = _row(cli, killed)
    assert (row["state"], row["exit_code"], row["reason"]) == ("finished", 137, "killed")
    again = cli("kill", killed)
    assert again.returncode == 125 and b"is not running" in again.stderr


def test_following_logs_does_not_hold_off_the_idle_timeout(
    cli: RunCli, sandboxd: DaemonProcess
) -> None:
    command_id = _start(cli, "echo up; sleep 60", "--idle-timeout", "2")
    started = time.monotonic()
    follower = subprocess.run(
        [*CLI, "logs", "-f", command_id],
        capture_output=True,
        timeout=30,
        env=cli_env(sandboxd.url),
    )
    # The follower watched the whole time; the command was still killed as idle.
    assert follower.returncode == 0 and follower.stdout == b"up\n"
    assert time.monotonic() - started < 15
    [row] = [
        r for r in json.loads(cli("ps", "-a", "--json").stdout) if r["command_id"] == command_id
    ]
    assert row["reason"] == "idle"


def test_web_prints_the_url_with_the_token_in_the_fragment(cli: RunCli) -> None:
    done = cli("--url", "http://box:8080", "--token", "s3cret", "web")
    assert done.stdout == b"http://box:8080/#token=s3cret\n"
