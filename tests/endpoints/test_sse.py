"""SSE execution and the blocking ``POST /execute`` over raw HTTP (protocol.md §3, §4)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from sandboxd.endpoints import sse
from tests.helpers import Daemon, http_request, running_daemon


def parse_events(body: bytes) -> list[tuple[str, Any]]:
    """The events of an SSE body: (name, JSON data), and ("comment", text) for ':' lines."""
    events: list[tuple[str, Any]] = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append(("comment", block[1:].strip()))
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def post(
    daemon: Daemon, path: str, payload: dict[str, Any]
) -> tuple[int, bytes, dict[str, str]]:
    response = await http_request(
        daemon.running.address,
        "POST",
        path,
        json.dumps(payload).encode(),
        {"content-type": "application/json"},
    )
    return response.status, response.body, response.headers


def output(events: list[tuple[str, Any]], stream: str) -> bytes:
    return b"".join(base64.b64decode(d["data"]) for name, d in events if name == stream)


async def test_a_stream_starts_with_started_and_ends_with_stream_end_and_exit(
    daemon: Daemon,
) -> None:
    with trio.fail_after(10):
        status, body, headers = await post(
            daemon,
            "/execute/stream/start",
            {"command": "printf 'h\\xc3\\xa9'; echo e >&2; exit 4", "command_id": uuid.uuid4().hex},
        )
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = parse_events(body)
    assert events[0][0] == "started" and isinstance(events[0][1]["pid"], int)
    assert output(events, "stdout") == "hé".encode() and output(events, "stderr") == b"e\n"
    names = [name for name, _ in events]
    assert names[-3:] == ["stream_end", "stream_end", "exit"]
    ends = {d["stream"]: d["offset"] for name, d in events if name == "stream_end"}
    assert ends == {"stdout": 3, "stderr": 2}
    assert events[-1][1] == {"exit_code": 4}


async def read_to_the_end(
    daemon: Daemon, command_id: str, body: bytes, before_resume: Callable[[], Awaitable[None]]
) -> tuple[bytes, int, tuple[str, Any]]:
    """Follow the SSE responses from the first ``body`` through every ``ack_required``
    and resume, as the SDK does: (stdout, resumes, the last event)."""
    collected = b""
    rounds = 0
    while True:
        events = parse_events(body)
        assert events[0][0] == "started"
        chunks = [d for name, d in events if name == "stdout"]
        for chunk in chunks:
            assert chunk["offset"] == len(collected)  # no gap, no overlap
            collected += base64.b64decode(chunk["data"])
        last_name, last = events[-1]
        if last_name != "ack_required":
            return collected, rounds, events[-1]
        assert last["stdout_offset"] == len(collected)
        rounds += 1
        await before_resume()
        status, body, _ = await post(
            daemon, "/execute/stream/resume", {"command_id": command_id, **last}
        )
        assert status == 200, body


async def test_ack_required_names_the_end_of_what_was_sent_and_resume_continues_exactly() -> None:
    async with running_daemon(sse_ack_bytes=65536) as daemon:
        command_id = uuid.uuid4().hex
        with trio.fail_after(20):
            status, body, _ = await post(
                daemon,
                "/execute/stream/start",
                {"command": "seq 1 100000", "command_id": command_id},
            )
            assert status == 200
            collected, rounds, last = await read_to_the_end(
                daemon, command_id, body, trio.lowlevel.checkpoint
            )
    expected = "".join(f"{i}\n" for i in range(1, 100001)).encode()
    assert collected == expected and rounds >= 5 and last == ("exit", {"exit_code": 0})


async def test_ttl_0_over_sse_delivers_every_byte_across_resumes_after_the_finish() -> None:
    size = 12_000_000
    # A ring that lets the command run to its end while the reader waits between two
    # responses: the session is gone (ttl 0) before the reader resumes.
    async with running_daemon(sse_ack_bytes=1 << 20, ring_bytes=64 << 20) as daemon:
        supervisor = daemon.running.supervisor
        command_id = uuid.uuid4().hex

        async def after_the_finish() -> None:
            while command_id in supervisor.sessions:
                await trio.sleep(0.01)

        with trio.fail_after(60):
            status, body, _ = await post(
                daemon,
                "/execute/stream/start",
                {
                    "command": f"head -c {size} /dev/zero | tr '\\0' z",
                    "command_id": command_id,
                    "ttl_seconds": 0,
                },
            )
            assert status == 200
            collected, rounds, last = await read_to_the_end(
                daemon, command_id, body, after_the_finish
            )
            while supervisor.pool.total:  # freed by the last response's detach
                await trio.sleep(0.01)
            assert len(supervisor.handoffs) == 0
            # A new resume after the finish is told the session expired.
            late, late_body, _ = await post(
                daemon, "/execute/stream/resume", {"command_id": command_id}
            )
    assert collected == b"z" * size and rounds >= 8 and last == ("exit", {"exit_code": 0})
    assert late == 410 and json.loads(late_body)["detail"]["error"] == "SessionExpired"


async def test_resuming_at_the_final_offset_repeats_stream_end_and_exit(daemon: Daemon) -> None:
    command_id = uuid.uuid4().hex
    with trio.fail_after(10):
        await post(daemon, "/execute/stream/start", {"command": "echo x", "command_id": command_id})
        _, body, _ = await post(
            daemon,
            "/execute/stream/resume",
            {"command_id": command_id, "stdout_offset": 2, "stderr_offset": 0},
        )
    assert [name for name, _ in parse_events(body)] == [
        "started",
        "stream_end",
        "stream_end",
        "exit",
    ]


async def test_start_resent_with_the_same_id_attaches_instead_of_spawning(daemon: Daemon) -> None:
    command_id = uuid.uuid4().hex
    payload = {"command": "echo once; sleep 0.3", "command_id": command_id}
    with trio.fail_after(10):
        _, first, _ = await post(daemon, "/execute/stream/start", payload)
        _, second, _ = await post(daemon, "/execute/stream/start", payload)
    a, b = parse_events(first), parse_events(second)
    assert a[0][1]["pid"] == b[0][1]["pid"]
    assert output(a, "stdout") == output(b, "stdout") == b"once\n"


async def test_resume_of_an_unknown_command_is_404_with_detail(daemon: Daemon) -> None:
    with trio.fail_after(10):
        status, body, _ = await post(daemon, "/execute/stream/resume", {"command_id": "nope"})
    assert status == 404 and json.loads(body)["detail"]["error"] == "CommandNotFound"


async def test_a_timeout_is_an_error_event(daemon: Daemon) -> None:
    with trio.fail_after(10):
        _, body, _ = await post(
            daemon, "/execute/stream/start", {"command": "sleep 10", "timeout_seconds": 1}
        )
    assert parse_events(body)[-1] == (
        "error",
        {"error_type": "CommandTimeout", "error": "Command timed out after 1 seconds"},
    )


async def test_idle_streams_carry_heartbeat_comments(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "HEARTBEAT_SECONDS", 0.2)
    with trio.fail_after(10):
        _, body, _ = await post(daemon, "/execute/stream/start", {"command": "sleep 1"})
    assert ("comment", "ping") in parse_events(body)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"command": "x", "env": {"A": "1"}, "run_config": {"env_vars": {}}}, "cannot be combined"),
        ({"command": "x", "cwd": "relative"}, "absolute"),
        ({"command_id": "x"}, "missing required field `command`"),
    ],
)
async def test_bad_starts_are_400_without_spawning(
    daemon: Daemon, payload: dict[str, Any], says: str
) -> None:
    with trio.fail_after(10):
        status, body, _ = await post(daemon, "/execute/stream/start", payload)
    assert status == 400 and says in json.loads(body)["detail"]["message"]
    assert not daemon.running.supervisor.sessions


async def test_blocking_execute_returns_output_and_code(daemon: Daemon) -> None:
    with trio.fail_after(10):
        status, body, _ = await post(
            daemon,
            "/execute",
            {"command": "echo out; echo err >&2; exit 2", "timeout": 10, "env": {"A": "1"}},
        )
        timed_status, timed_body, _ = await post(
            daemon, "/execute", {"command": "sleep 10", "timeout": 1}
        )
    assert status == 200 and json.loads(body) == {
        "stdout": "out\n",
        "stderr": "err\n",
        "exit_code": 2,
    }
    assert timed_status == 408 and json.loads(timed_body)["detail"]["error"] == "CommandTimeout"


async def test_blocking_execute_collects_64_mib_per_stream_and_answers_413_past_it(
    daemon: Daemon,
) -> None:
    limit = 64 * 1024 * 1024
    with trio.fail_after(120):
        exact_status, exact_body, _ = await post(
            daemon, "/execute", {"command": f"head -c {limit} /dev/zero | tr '\\0' a >&2"}
        )
        over_status, over_body, _ = await post(
            daemon, "/execute", {"command": f"head -c {limit + 1} /dev/zero | tr '\\0' a"}
        )
        endless_status, _, _ = await post(daemon, "/execute", {"command": "yes"})
        while daemon.running.supervisor.sessions:  # the endless command was killed
            await trio.sleep(0.05)
    exact = json.loads(exact_body)
    assert exact_status == 200 and exact["exit_code"] == 0
    assert exact["stderr"] == "a" * limit and exact["stdout"] == ""
    assert over_status == 413 and endless_status == 413
    detail = json.loads(over_body)["detail"]
    assert (
        detail["error"] == "PayloadTooLarge" and f"stdout passed {limit} bytes" in detail["message"]
    )


async def test_blocking_execute_returns_the_whole_of_a_large_output() -> None:
    # POST /execute runs with ttl 0: its reader must get the output after the finish too.
    size = 12_000_000
    async with running_daemon() as daemon:
        with trio.fail_after(60):
            status, body, _ = await post(
                daemon,
                "/execute",
                {"command": f"head -c {size} /dev/zero | tr '\\0' z; echo e >&2", "timeout": 60},
            )
            while daemon.running.supervisor.pool.total:
                await trio.sleep(0.01)
    assert status == 200
    assert json.loads(body) == {"stdout": "z" * size, "stderr": "e\n", "exit_code": 0}
