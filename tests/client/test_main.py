"""The CLI's exit statuses and plain one-line errors, through the real ``sandboxd``
subprocess against a real daemon process (protocol.md §2 underneath)."""

from __future__ import annotations

import uuid

import pytest

from tests.client.conftest import CLI, RunCli, cli_env
from tests.sdk.conftest import daemon_process


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["true"], 0),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -9 $$"], 137),
        (["no-such-program-here"], 127),
    ],
)
def test_exec_exits_with_the_commands_own_status(cli: RunCli, argv: list[str], code: int) -> None:
    assert cli("exec", "--", *argv).returncode == code


def test_exec_passes_argv_exactly_and_keeps_stdout_and_stderr_apart(cli: RunCli) -> None:
    done = cli("exec", "--", "sh", "-c", 'printf "%s|" "$@"; echo err >&2', "x", "a b", "$HOME")
    assert done.stdout == b"a b|$HOME|" and done.stderr == b"err\n"


def test_exec_applies_env_workdir_and_streams_stdin_with_i(cli: RunCli) -> None:
    done = cli("exec", "-e", "A=1", "-w", "/tmp", "--", "sh", "-c", 'echo "$A $PWD"')
    assert done.stdout == b"1 /tmp\n"
    piped = cli("exec", "-i", "--", "wc", "-c", input=b"x" * 100_000)
    assert piped.stdout.strip() == b"100000" and piped.returncode == 0


def test_an_unreachable_daemon_is_125_and_says_so(cli: RunCli) -> None:
    done = cli("--url", "http://127.0.0.1:9", "exec", "--", "true")
    assert done.returncode == 125
    [line] = done.stderr.decode().splitlines()
    assert "cannot reach the daemon at http://127.0.0.1:9" in line


def test_a_wrong_token_is_125_and_says_so() -> None:
    import subprocess

    with daemon_process("--token", "right-token") as daemon:
        for args in (["exec", "--", "true"], ["ps"]):
            done = subprocess.run(
                [*CLI, *args],
                capture_output=True,
                timeout=60,
                env=cli_env(daemon.url, SANDBOXD_TOKEN="wrong"),
            )
            assert done.returncode == 125
            assert "refused the token (HTTP 401)" in done.stderr.decode()
        good = subprocess.run(
            [*CLI, "--token", "right-token", "exec", "--", "echo", "in"],
            capture_output=True,
            timeout=60,
            env=cli_env(daemon.url),
        )
        assert (good.returncode, good.stdout) == (0, b"in\n")


@pytest.mark.parametrize("verb", ["attach", "logs", "kill"])
def test_an_unknown_id_is_125_and_says_so(cli: RunCli, verb: str) -> None:
    done = cli(verb, "no-such-id")
    assert done.returncode == 125
    assert done.stderr.decode().strip() == (
        "sandboxd: no command with id no-such-id (never started, or expired)"
    )


def test_a_usage_error_is_125(cli: RunCli) -> None:
    assert cli("exec").returncode == 125
    assert cli("logs", "-n", "many", "x").returncode == 125


def test_a_timeout_is_124_with_a_message(cli: RunCli) -> None:
    done = cli("exec", "--timeout", "1", "--", "sleep", "30")
    assert done.returncode == 124 and b"timed out" in done.stderr


def test_exec_d_prints_the_id_and_the_command_runs_on(cli: RunCli) -> None:
    command_id = uuid.uuid4().hex
    done = cli("exec", "-d", "--id", command_id, "--", "sh", "-c", "sleep 1; echo later")
    assert (done.returncode, done.stdout) == (0, command_id.encode() + b"\n")
    followed = cli("logs", "-f", command_id)
    assert followed.stdout == b"later\n"
