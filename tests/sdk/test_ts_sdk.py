"""The released TypeScript SDK (langsmith@0.12.0 with ``ws``), unmodified, under node.

Each test runs one scenario of ``tests/sdk/ts/scenarios.mjs`` against a real sandboxd
and checks what the SDK handed to its caller. ``make test`` installs the npm packages.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time
from typing import Any

import pytest
import trio

from tests.helpers import spend_auth_budget
from tests.sdk.conftest import DaemonProcess, daemon_process

pytestmark = pytest.mark.sdk

TS_DIR = pathlib.Path(__file__).parent / "ts"
NODE = shutil.which("node")

if NODE is None or not (TS_DIR / "node_modules" / "langsmith").is_dir():
    pytest.fail(
        "node and tests/sdk/ts/node_modules are needed: run `make test`, which installs them",
        pytrace=False,
    )


def scenario(
    daemon: DaemonProcess, name: str, *node_flags: str, api_key: str | None = None
) -> dict[str, Any]:
    assert NODE is not None
    env = dict(os.environ)
    if api_key is not None:
        env["SANDBOXD_TEST_API_KEY"] = api_key
    done = subprocess.run(
        [NODE, *node_flags, "scenarios.mjs", daemon.url, name],
        cwd=TS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_run_returns_output_and_exit_code(sandboxd: DaemonProcess) -> None:
    assert scenario(sandboxd, "run") == {"stdout": "héllo\n", "stderr": "warn\n", "exit_code": 3}


def test_large_output_arrives_whole(sandboxd: DaemonProcess) -> None:
    assert scenario(sandboxd, "big") == {"length": 20_000_000, "allZ": True, "exit_code": 0}


def test_large_output_of_a_ttl_0_command_arrives_whole(sandboxd: DaemonProcess) -> None:
    assert scenario(sandboxd, "bigTtl0") == {"length": 12_000_000, "allZ": True, "exit_code": 0}


def test_callbacks_stream_each_chunk(sandboxd: DaemonProcess) -> None:
    result = scenario(sandboxd, "streaming")
    assert "".join(result["out"]) == "1\n2\n3\n" and "".join(result["err"]) == "e1\ne2\ne3\n"
    assert len(result["out"]) >= 2
    assert result["exit_code"] == 0


def test_kill_is_answered_with_an_exit_frame(sandboxd: DaemonProcess) -> None:
    result = scenario(sandboxd, "kill")
    assert result["seen"] == ["started\n"]
    assert result["exit_code"] == 137


def test_reconnect_resumes_from_the_offset(sandboxd: DaemonProcess) -> None:
    result = scenario(sandboxd, "reconnect")
    assert result["first"] == "one\n" and result["stdout"] == "two\n"
    assert result["exit_code"] == 4
    assert len(result["id"]) == 36  # the TS client's dashed UUIDv7


def test_input_and_close_input(sandboxd: DaemonProcess) -> None:
    assert scenario(sandboxd, "input") == {"stdout": "from ts\ndone\n", "exit_code": 0}


def test_pty(sandboxd: DaemonProcess) -> None:
    assert scenario(sandboxd, "pty") == {"stdout": "tty\r\n", "exit_code": 0}


def test_timeout_raises_the_timeout_error(sandboxd: DaemonProcess) -> None:
    assert scenario(sandboxd, "timeout") == {"raised": "LangSmithCommandTimeoutError"}


def test_files_search_and_their_errors(sandboxd: DaemonProcess) -> None:
    result = scenario(sandboxd, "files")
    assert result == {
        "text": "héllo\nneedle line\n",
        "size": 19,
        "range": "needle",
        "rangeStart": 7,
        "past": "LangSmithSandboxOperationError",
        "globbed": [["/sub/a.txt", False]],
        "globTruncated": False,
        "listed": [["/sub", True]],
        "grepped": [["/sub/a.txt", 2, "needle line"]],
        "missing": "LangSmithResourceNotFoundError",
    }


def test_without_ws_the_sdk_falls_back_to_blocking_execute(sandboxd: DaemonProcess) -> None:
    result = scenario(sandboxd, "blocking", "--import", "./hide-ws.mjs")
    assert result == {"stdout": "blocking\n", "stderr": "err\n", "exit_code": 6}
    deadline = time.monotonic() + 5  # the log line may still be on its way
    while time.monotonic() < deadline:
        started = [e for e in sandboxd.logs if e.get("msg") == "command started"]
        if started and started[-1]["via"] == "http":
            break
        time.sleep(0.05)
    assert started[-1]["via"] == "http"


def test_run_is_served_after_50_failed_authentications_from_its_address() -> None:
    token = "ts-t0ken"

    with daemon_process("--token", token) as daemon:
        trio.run(spend_auth_budget, daemon.address, token)
        result = scenario(daemon, "run", api_key=token)
    assert result == {"stdout": "héllo\n", "stderr": "warn\n", "exit_code": 3}
