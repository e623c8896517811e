"""``/execute/ws`` against a real daemon with raw frames: protocol.md §9, items 1-33.

Each test names the §9 item(s) it proves. The SDK-driven versions live in tests/sdk/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psutil
import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto.events import TextMessage

from sandboxd.core.session import SessionState
from tests.conftest import OtherUser
from tests.helpers import (
    Daemon,
    ExecClient,
    Transcript,
    exec_socket,
    open_ws,
    raw_ws,
    rejection,
    run_command,
    running_daemon,
)


def new_id() -> str:
    return uuid.uuid4().hex


async def gone(pid: int, within: float = 5.0) -> None:
    """Wait until ``pid`` has ended (gone, or a zombie waiting for its reaper)."""
    with trio.fail_after(within):
        while True:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            await trio.sleep(0.05)


async def test_started_comes_first_with_the_given_id_then_output_exit_and_close_1000(
    daemon: Daemon,
) -> None:  # items 3, 9, 32
    with trio.fail_after(10):
        command_id = new_id()
        t = await run_command(daemon.ws, "echo out; echo err >&2; exit 7", command_id=command_id)
    assert t.frames[0] == {"type": "started", "command_id": command_id, "pid": t.frames[0]["pid"]}
    assert isinstance(t.frames[0]["pid"], int)
    assert t.text("stdout") == "out\n"
    assert t.text("stderr") == "err\n"
    assert t.terminal["type"] == "exit" and t.terminal["exit_code"] == 7
    assert t.types.count("exit") == 1
    assert t.close_code == 1000


async def test_execute_without_command_id_gets_one_that_reconnect_accepts(
    daemon: Daemon,
) -> None:  # item 4
    with trio.fail_after(10):
        first = await run_command(daemon.ws, "echo hi")
        command_id = first.frames[0]["command_id"]
        assert command_id
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id)
            again = await client.collect()
    assert again.frames[0]["command_id"] == command_id
    assert again.text("stdout") == "hi\n"
    assert again.terminal["exit_code"] == 0


async def test_offsets_are_contiguous_utf8_byte_counts_across_many_chunks(
    daemon: Daemon,
) -> None:  # items 5, 6, 8
    script = "python3 -c \"import sys; sys.stdout.write('é' * 200000 + '😀' * 5000)\""
    with trio.fail_after(20):
        t = await run_command(daemon.ws, script)
    t.assert_contiguous()
    text = t.text("stdout")
    assert text == "é" * 200000 + "😀" * 5000
    assert "\ufffd" not in text
    assert len([f for f in t.frames if f["type"] == "stdout"]) > 1


async def test_invalid_utf8_becomes_replacement_characters_with_exact_offsets(
    daemon: Daemon,
) -> None:  # item 7
    with trio.fail_after(10):
        t = await run_command(daemon.ws, r"printf 'a\xff\xfeb'; printf '\xe2\x82' >&2")
    t.assert_contiguous()
    assert t.text("stdout") == "a\ufffd\ufffdb"
    assert t.text("stderr") == "\ufffd"


async def test_a_50_mb_burst_arrives_whole_in_frames_under_one_mib(daemon: Daemon) -> None:
    # items 8, 9: the client caps messages at 1 MiB like the Python SDK
    with trio.fail_after(60):
        t = await run_command(daemon.ws, "head -c 50000000 /dev/zero | tr '\\0' '\\1'")
    t.assert_contiguous()
    assert len(t.text("stdout")) == 50_000_000
    assert t.terminal["exit_code"] == 0


async def _execute_at(
    go: trio.Event, client: ExecClient, frame: dict[str, object], into: list[Transcript]
) -> None:
    await go.wait()
    await client.send(type="execute", close_stdin=True, **frame)
    into.append(await client.collect())


async def test_two_executes_with_one_id_at_the_same_instant_spawn_once(
    daemon: Daemon, tmp_path: object
) -> None:
    # protocol.md §2.7.1: get-or-create. The second socket is answered like a reconnect
    # at 0/0: `started` with the same id and pid, all the output, the same exit.
    rounds = 25
    with trio.fail_after(60):
        for round_ in range(rounds):
            command_id = new_id()
            log = f"{tmp_path}/spawns-{round_}"
            frame = {"command": f"echo spawned >> {log}; echo out", "command_id": command_id}
            transcripts: list[Transcript] = []
            async with exec_socket(daemon.ws) as one, exec_socket(daemon.ws) as two:
                go = trio.Event()
                async with trio.open_nursery() as nursery:
                    for client in (one, two):
                        nursery.start_soon(_execute_at, go, client, frame, transcripts)
                    await trio.sleep(0.01)
                    go.set()  # both tasks are waiting: they send in the same scheduler tick
            with open(log) as spawns:
                assert spawns.read() == "spawned\n", round_
            first, second = transcripts
            assert first.frames[0] == second.frames[0]  # started: same id, same pid
            assert first.frames[0]["command_id"] == command_id
            for t in transcripts:
                assert t.text("stdout") == "out\n" and t.terminal["exit_code"] == 0
                assert t.close_code == 1000


async def test_timeout_kills_the_group_and_reports_command_timeout(daemon: Daemon) -> None:
    # item 10
    with trio.fail_after(10):
        start = trio.current_time()
        t = await run_command(daemon.ws, "sleep 30 & echo $!; sleep 30", timeout_seconds=1)
        elapsed = trio.current_time() - start
        await gone(t.frames[0]["pid"])  # the leader
        await gone(int(t.text("stdout")))  # and the rest of its group
    assert t.terminal == {
        "type": "error",
        "error_type": "CommandTimeout",
        "error": "Command timed out after 1 seconds",
    }
    assert "exit" not in t.types
    assert 1 <= elapsed < 2.5


async def test_timeout_zero_sets_no_deadline(daemon: Daemon) -> None:  # item 11
    with trio.fail_after(10):
        t = await run_command(daemon.ws, "sleep 1.5; echo done", timeout_seconds=0)
    assert t.text("stdout") == "done\n" and t.terminal["exit_code"] == 0


async def test_close_stdin_at_spawn_gives_cat_eof(daemon: Daemon) -> None:  # item 12
    with trio.fail_after(10):
        t = await run_command(daemon.ws, "cat; echo rc=$?", close_stdin=True)
    assert t.text("stdout") == "rc=0\n"


async def test_input_frames_reach_stdin_in_order_and_close_stdin_ends_cat(
    daemon: Daemon,
) -> None:  # item 13
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="cat")
            for piece in ("a", "b", "c\n"):
                await client.send(type="input", data=piece)
            await client.send(type="close_stdin")
            t = await client.collect()
    assert t.text("stdout") == "abc\n"
    assert t.terminal["exit_code"] == 0


async def test_kill_takes_the_whole_group_and_readers_get_a_nonzero_exit(
    daemon: Daemon,
) -> None:  # item 14
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="sleep 60 & echo $!; wait")
            grandchild = int((await client.recv_until("stdout"))["data"])
            await client.send(type="kill")
            t = await client.collect()
    assert t.terminal["type"] == "exit"
    assert t.terminal["exit_code"] == 137
    assert t.terminal["signal"] == "KILL" and t.terminal["reason"] == "killed"
    await gone(grandchild)


async def test_kill_then_abrupt_drop_still_kills_and_the_daemon_keeps_serving(
    daemon: Daemon,
) -> None:  # item 15
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.send(type="execute", command="sleep 60", command_id=command_id)
            started = await client.recv_until("started")
            await client.send(type="kill")
            await client.stream.aclose()  # no close handshake, like the Python SDK
        live = daemon.running.supervisor.sessions[command_id]
        await live.reaped.wait()
        assert live.status is not None and live.status.code == 137
        assert started["pid"] == live.child.pid
        t = await run_command(daemon.ws, "echo still serving")
    assert t.text("stdout") == "still serving\n"


async def test_pty_is_a_controlling_tty_merges_stderr_and_eot_ends_cat(daemon: Daemon) -> None:
    # item 16
    with trio.fail_after(10):
        t = await run_command(
            daemon.ws,
            "test -t 0 && test -t 1 && echo tty; echo to-stderr >&2; "
            "stty size; echo $TERM; tty >/dev/null && echo ctty",
            pty=True,
        )
    lines = t.text("stdout").split("\r\n")
    assert lines == ["tty", "to-stderr", "24 80", "xterm-256color", "ctty", ""]
    assert "stderr" not in t.types
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="cat; echo cat-ended", pty=True)
            await client.send(type="input", data="hello\n")
            await client.send(type="input", data="\x04")
            t = await client.collect()
    assert "hello" in t.text("stdout") and "cat-ended" in t.text("stdout")
    assert t.terminal["exit_code"] == 0


#: A child that outlives its leader on the terminal and is not part of its command any more:
#: deaf to the hangup the leader's exit sends, in a session of its own, untagged.
HOLDER = (
    "(trap '' HUP; exec env -i setsid sleep 60) & echo $! > {pid_file}; sleep 0.2; echo leader-done"
)


async def test_output_the_relay_left_in_the_master_still_reaches_the_client(daemon: Daemon) -> None:
    # The relay ends (here: stopped, then killed) with the command's last output still in
    # the master, as a read that gets EIO too early leaves it: the daemon reads it there.
    command_id = new_id()
    with trio.fail_after(20):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="read x; echo tail-$x", command_id=command_id, pty=True)
            live = daemon.running.supervisor.sessions[command_id]
            relay = live.output_relay
            assert relay
            os.kill(relay, signal.SIGSTOP)
            while psutil.Process(relay).status() != psutil.STATUS_STOPPED:  # (reads nothing)
                await trio.sleep(0.01)
            await client.send(type="input", data="one\n")
            await live.reaped.wait()  # the command wrote its line and exited
            os.kill(relay, signal.SIGKILL)
            t = await client.collect()
    assert t.text("stdout") == "one\r\ntail-one\r\n"
    assert t.terminal["exit_code"] == 0


async def test_a_pty_child_left_holding_the_terminal_does_not_keep_its_relays_after_the_drain(
    tmp_path: pathlib.Path,
) -> None:
    # The leader exits; a background child that left the session and dropped its
    # environment (nothing the daemon kills as part of the command) keeps the terminal.
    # After the drain the session finishes, the relay is gone and the master is closed.
    pid_file = tmp_path / "holder.pid"
    command_id = new_id()
    async with running_daemon(drain_seconds=0.5) as daemon:
        holder = 0
        try:
            with trio.fail_after(20):
                async with exec_socket(daemon.ws) as client:
                    await client.start(
                        command=HOLDER.format(pid_file=pid_file),
                        command_id=command_id,
                        pty=True,
                    )
                    live = daemon.running.supervisor.sessions[command_id]
                    relays = live.child.relays
                    relays = tuple(pid for pid in relays or () if pid)  # (no input relay: 0)
                    assert relays and all(psutil.pid_exists(pid) for pid in relays)
                    t = await client.collect()
                assert t.text("stdout") == "leader-done\r\n" and t.terminal["exit_code"] == 0
                holder = int(pid_file.read_text())
                while psutil.Process(holder).name() != "sleep":  # (bash until its exec)
                    await trio.sleep(0.02)
                while live.output_relay or live.input_relay:
                    await trio.sleep(0.02)
                assert live.terminal_fd is None
                assert not {p.pid for p in psutil.Process().children()} & set(relays)
        finally:
            if holder:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(holder, 9)


async def test_reconnect_to_a_running_command_resumes_at_the_offsets(
    daemon: Daemon,
) -> None:  # item 17
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="echo one; read line; echo $line", command_id=command_id)
            first = await client.recv_until("stdout")
        assert first["data"] == "one\n"
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id, stdout_offset=4)
            assert (await client.recv()) == {
                "type": "started",
                "command_id": command_id,
                "pid": client.transcript.frames[0]["pid"],
            }
            await client.send(type="input", data="two\n")
            t = await client.collect()
    assert t.text("stdout") == "two\n"
    t.assert_contiguous(stdout_from=4)
    assert t.terminal["exit_code"] == 0


async def test_reconnect_after_exit_replays_from_offsets_and_repeats_the_terminal(
    daemon: Daemon,
) -> None:  # item 18
    with trio.fail_after(10):
        t = await run_command(daemon.ws, "printf 'héllo'; exit 5")
        command_id = t.frames[0]["command_id"]
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id, stdout_offset=3)
            again = await client.collect()
        timed = await run_command(daemon.ws, "echo x; sleep 10", timeout_seconds=1)
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=timed.frames[0]["command_id"])
            timed_again = await client.collect()
    assert again.text("stdout") == "llo"
    again.assert_contiguous(stdout_from=3)
    assert again.terminal["exit_code"] == 5
    assert timed_again.text("stdout") == "x\n"
    assert timed_again.terminal["error_type"] == "CommandTimeout"


async def test_reconnect_older_than_the_ring_starts_at_the_oldest_byte_with_a_gap() -> None:
    # item 19, and the gap frame of the core issue
    async with running_daemon(ring_bytes=64 * 1024) as daemon:
        with trio.fail_after(20):
            t = await run_command(daemon.ws, "seq 1 100000")  # 588,895 bytes
            command_id = t.frames[0]["command_id"]
            async with exec_socket(daemon.ws) as client:
                await client.send(type="reconnect", command_id=command_id, stdout_offset=10)
                again = await client.collect()
    gap = next(f for f in again.frames if f["type"] == "gap")
    first = next(f for f in again.frames if f["type"] == "stdout")
    assert gap["stream"] == "stdout" and gap["from"] == 10 and gap["to"] == first["offset"]
    assert first["offset"] > 10
    again.assert_contiguous(stdout_from=first["offset"])
    assert (first["offset"] + len(again.text("stdout").encode())) == 588_895
    assert again.text("stdout").endswith("99999\n100000\n")


async def test_unknown_id_is_command_not_found_and_expired_is_session_expired(
    daemon: Daemon,
) -> None:  # item 20
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id="nope")
            t = await client.collect()
        assert t.frames == [
            {"type": "error", "error_type": "CommandNotFound", "error": "Command not found: nope"}
        ]
        assert t.close_code == 1000
        done = await run_command(daemon.ws, "true", ttl_seconds=0)
        command_id = done.frames[0]["command_id"]
        while command_id in daemon.running.supervisor.sessions:
            await trio.sleep(0.01)
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id)
            t = await client.collect()
    assert t.frames[0]["error_type"] == "SessionExpired"


async def test_repeated_execute_with_one_id_spawns_once(daemon: Daemon) -> None:  # item 21
    command_id = new_id()
    marker = f"/tmp/sandboxd-test-{command_id}"
    frame = {
        "type": "execute",
        "command": f"echo run >> {marker}; echo out; sleep 0.5",
        "command_id": command_id,
        "close_stdin": True,
    }
    try:
        with trio.fail_after(10):
            async with exec_socket(daemon.ws) as a, exec_socket(daemon.ws) as b:
                await a.send(**frame)
                first = await a.recv_until("started")
                await b.send(**frame)
                second = await b.recv_until("started")
                ta, tb = await a.collect(), await b.collect()
            tc = await run_command(daemon.ws, frame["command"], command_id=command_id)
        assert first["pid"] == second["pid"] == tc.frames[0]["pid"]
        assert ta.text("stdout") == tb.text("stdout") == tc.text("stdout") == "out\n"
        assert tc.terminal["exit_code"] == 0
        with open(marker) as f:
            assert f.read() == "run\n"
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


async def test_two_sockets_both_get_everything_and_either_can_send_input(
    daemon: Daemon,
) -> None:  # item 22
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as a, exec_socket(daemon.ws) as b:
            await a.start(command="read x; echo got $x", command_id=command_id)
            await b.send(type="reconnect", command_id=command_id)
            await b.recv_until("started")
            await b.send(type="input", data="hi\n")
            ta, tb = await a.collect(), await b.collect()
    assert ta.text("stdout") == tb.text("stdout") == "got hi\n"
    assert ta.terminal == tb.terminal


async def test_a_control_frame_before_reconnect_is_held_and_applied(
    daemon: Daemon,
) -> None:  # item 23
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="cat; echo eof", command_id=command_id)
        async with exec_socket(daemon.ws) as client:
            await client.send(type="close_stdin")
            await client.send(type="reconnect", command_id=command_id)
            t = await client.collect()
    assert t.types[0] == "started"
    assert t.text("stdout") == "eof\n"


async def test_idle_timeout_kills_only_without_clients(daemon: Daemon) -> None:  # item 24
    command_id = new_id()
    with trio.fail_after(15):
        async with exec_socket(daemon.ws) as client:
            await client.start(
                command="sleep 2.5; echo survived; sleep 60",
                command_id=command_id,
                idle_timeout_seconds=1,
            )
            assert (await client.recv_until("stdout"))["data"] == "survived\n"
        live = daemon.running.supervisor.sessions[command_id]
        start = trio.current_time()
        await live.reaped.wait()
        assert 0.9 <= trio.current_time() - start < 2.5
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id)
            t = await client.collect()
    assert t.terminal["exit_code"] == 137 and t.terminal["reason"] == "idle"


async def test_kill_on_disconnect_kills_after_the_last_client_leaves_even_by_tcp_drop(
    daemon: Daemon,
) -> None:  # item 25
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as a, exec_socket(daemon.ws) as b:
            await a.start(command="sleep 60", command_id=command_id, kill_on_disconnect=True)
            await b.send(type="reconnect", command_id=command_id)
            await b.recv_until("started")
            await a.ws.aclose()
            live = daemon.running.supervisor.sessions[command_id]
            await trio.sleep(0.3)
            assert live.status is None, "one client is still attached"
            await b.stream.aclose()  # abrupt TCP drop
            start = trio.current_time()
            await live.reaped.wait()
            assert trio.current_time() - start < 1.0
    assert live.status is not None and live.status.code == 137
    assert live.core.end_reason is not None and live.core.end_reason.value == "disconnect"


async def test_without_kill_on_disconnect_output_made_while_away_is_replayed(
    daemon: Daemon,
) -> None:  # item 26
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="echo a; sleep 0.5; echo b", command_id=command_id)
            await client.recv_until("stdout")
        await trio.sleep(1)
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id, stdout_offset=2)
            t = await client.collect()
    assert t.text("stdout") == "b\n" and t.terminal["exit_code"] == 0


async def test_ttl_keeps_a_finished_session_for_n_seconds_then_drops_it(
    daemon: Daemon,
) -> None:  # item 27
    with trio.fail_after(10):
        t = await run_command(daemon.ws, "echo kept", ttl_seconds=1)
        command_id = t.frames[0]["command_id"]
        await trio.sleep(0.5)
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id)
            assert (await client.collect()).text("stdout") == "kept\n"
        await trio.sleep(1.0)
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id)
            gone = await client.collect()
        forever = await run_command(daemon.ws, "true", ttl_seconds=-1)
    assert gone.frames[0]["error_type"] == "SessionExpired"
    assert forever.frames[0]["command_id"] in daemon.running.supervisor.sessions


async def test_run_config_and_legacy_env_cwd_are_applied(daemon: Daemon, tmp_path: object) -> None:
    # item 28
    script = "pwd; echo $A; id -un"
    with trio.fail_after(10):
        modern = await run_command(
            daemon.ws,
            script,
            run_config={"user": "nobody", "work_dir": "/tmp", "env_vars": {"A": "1"}},
        )
        legacy = await run_command(daemon.ws, script, env={"A": "2"}, cwd="/tmp")
        overridden = await run_command(daemon.ws, "echo $HOME", env={"HOME": "/elsewhere"})
        as_user_pty = await run_command(
            daemon.ws, "id -un; test -t 1 && echo tty", pty=True, run_config={"user": "nobody"}
        )
    assert modern.text("stdout") == "/tmp\n1\nnobody\n", modern.frames
    assert as_user_pty.text("stdout") == "nobody\r\ntty\r\n"
    assert legacy.text("stdout") == "/tmp\n2\nroot\n"
    assert overridden.text("stdout") == "/elsewhere\n"


@pytest.mark.parametrize(
    "fields",
    [
        {"run_config": {"env_vars": {"A": "1"}}, "env": {"B": "2"}},
        {"run_config": {"user": "root"}, "cwd": "/tmp"},
        {"run_config": {"work_dir": "relative/dir"}},
        {"cwd": "relative"},
        {"timeout_seconds": -5},
    ],
)
async def test_contradictory_requests_are_refused_before_spawning(
    daemon: Daemon, fields: dict[str, object]
) -> None:  # item 29
    with trio.fail_after(10):
        t = await run_command(daemon.ws, "touch /tmp/should-not-exist", **fields)
    assert t.frames == [t.frames[0]] and t.frames[0]["type"] == "error"
    assert t.frames[0]["error_type"] == "InvalidRequest"
    assert not daemon.running.supervisor.sessions


@pytest.mark.parametrize(
    "fields",
    [
        {"shell": "/no/such/shell"},
        {"cwd": "/no/such/dir"},
        {"run_config": {"user": "no-such-user-here"}},
        {"run_config": {"user": "root:no-such-group"}},
    ],
)
async def test_spawn_failures_are_an_error_frame_without_started(
    daemon: Daemon, fields: dict[str, object]
) -> None:  # item 30
    with trio.fail_after(10):
        t = await run_command(daemon.ws, "true", **fields)
    assert len(t.frames) == 1
    assert t.frames[0]["type"] == "error" and t.frames[0]["error_type"] == "CommandError"
    assert t.close_code == 1000


async def test_pings_are_answered_while_output_streams(daemon: Daemon) -> None:  # item 31
    with trio.fail_after(30):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="yes | head -c 30000000")
            await client.recv_until("stdout")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.collect)  # keep reading, as the SDK does
                for _ in range(3):
                    with trio.fail_after(2):
                        await client.ws.ping()
            assert client.transcript.terminal["exit_code"] == 0


async def test_upgrade_is_accepted_with_any_header_spelling_and_deflate_offer(
    daemon: Daemon,
) -> None:  # item 1
    headers = [
        ("x-api-key", "k"),
        ("X-Service-Key", "s"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ]
    with trio.fail_after(10):
        async with open_ws(daemon.ws, headers) as (ws, _):
            answer = {name.lower(): value for name, value in ws.handshake_headers}
            await ws.send_message(json.dumps({"type": "execute", "command": "echo ok"}))
            assert json.loads(await ws.get_message())["type"] == "started"
    assert b"sec-websocket-extensions" not in answer  # deflate declined (no --ws-compression)


async def test_unknown_paths_and_stopping_daemon_refuse_upgrades_with_a_detail_body() -> None:
    # item 2 and the refusal half of item 33
    async with running_daemon() as daemon:
        with trio.fail_after(10):
            not_found = await rejection(daemon.ws.replace("/execute/ws", "/nope"))
            daemon.running.supervisor.shutting_down = True
            refused = await rejection(daemon.ws)
            daemon.running.supervisor.shutting_down = False
    assert not_found.status_code == 404
    assert json.loads(not_found.body or b"")["detail"]["error"] == "NotFound"
    assert refused.status_code == 503
    assert dict(refused.headers or [])[b"retry-after"] == b"1"
    assert json.loads(refused.body or b"")["detail"]["error"] == "ServerShuttingDown"


async def test_a_stop_gives_attached_sockets_exit_then_1000_and_never_1001_before_started() -> None:
    # item 33 (1001 after `started`: test_shutdown_sends_1001_to_a_client_still_reading_...)
    async with running_daemon(stop_grace=0.5) as daemon, exec_socket(daemon.ws) as client:
        with trio.fail_after(10):
            await client.start(command="trap 'echo bye; exit 3' TERM; echo ready; sleep 60 & wait")
            await client.recv_until("stdout")  # the trap is set
            async with open_ws(daemon.ws) as (unbound, _):  # upgraded, nothing sent yet
                daemon.running.stop.set()
                t = await client.collect()
                with pytest.raises(ConnectionClosed) as closed:
                    await unbound.get_message()
    assert t.types[0] == "started"
    assert t.text("stdout") == "ready\nbye\n"
    assert t.terminal["exit_code"] == 3 and t.terminal["reason"] == "exited"
    assert t.close_code == 1000  # a normal close after the exit: the SDKs return the result
    assert closed.value.reason.code == 1000  # before `started`: the SDKs re-send the execute


async def test_bad_frames_get_an_invalid_request_error_and_the_command_lives_on(
    daemon: Daemon,
) -> None:
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="read x; echo $x", command_id=command_id)
            await client.ws.send_message("{not json")
            bad = await client.collect()
        async with exec_socket(daemon.ws) as client:
            await client.send(type="execute", command=5)
            wrong_type = await client.collect()
        async with exec_socket(daemon.ws) as client:
            await client.send(type="reconnect", command_id=command_id)
            await client.recv_until("started")
            await client.send(type="input", data="fine\n")
            t = await client.collect()
    assert bad.terminal["error_type"] == "InvalidRequest"
    assert wrong_type.frames[0]["error_type"] == "InvalidRequest"
    assert "Expected `str`, got `int`" in wrong_type.frames[0]["error"]
    assert t.text("stdout") == "fine\n"


async def test_shutdown_sends_1001_to_a_client_still_reading_after_the_commands_ended() -> None:
    command_id = new_id()
    async with running_daemon(stop_grace=0.5) as daemon:
        with trio.fail_after(20):
            async with exec_socket(daemon.ws) as client:
                await client.start(
                    command="head -c 8000000 /dev/zero | tr '\\0' a; sleep 60",
                    command_id=command_id,
                )
            live = daemon.running.supervisor.sessions[command_id]
            while live.core.stdout.end < 8_000_000:  # nobody attached: read at full speed
                await live.wait_changed()
            async with exec_socket(daemon.ws) as client:
                await client.send(type="reconnect", command_id=command_id)
                await client.recv_until("started")
                daemon.running.stop.set()
                try:
                    while True:
                        await client.recv()
                        await trio.sleep(0.05)  # a slow reader: far from the end for seconds
                except ConnectionClosed as closed:
                    code = closed.reason.code
    assert code == 1001
    assert "exit" not in client.transcript.types


async def test_commands_never_see_the_daemons_private_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "WATCHDOG_USEC", "SANDBOXD_TOKEN"):
        monkeypatch.setenv(name, "private")
    monkeypatch.setenv("IMAGE_SETTING", "visible")
    async with running_daemon() as daemon:
        with trio.fail_after(10):
            t = await run_command(daemon.ws, "env")
    seen = dict(line.split("=", 1) for line in t.text("stdout").splitlines() if "=" in line)
    assert seen["IMAGE_SETTING"] == "visible"
    assert not {"NOTIFY_SOCKET", "LISTEN_FDS", "WATCHDOG_USEC", "SANDBOXD_TOKEN"} & seen.keys()


# ---- the "watch" extension of reconnect -------------------------------------------------


async def test_a_watcher_gets_started_output_from_its_offsets_and_the_exit(
    daemon: Daemon,
) -> None:
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="echo one; echo two >&2; exit 3", command_id=command_id)
            await client.collect()
        async with exec_socket(daemon.ws) as watcher:
            await watcher.send(type="reconnect", command_id=command_id, stdout_offset=2, watch=True)
            t = await watcher.collect()
    assert t.types[0] == "started" and t.frames[0]["command_id"] == command_id
    assert t.text("stdout") == "e\n" and t.text("stderr") == "two\n"
    t.assert_contiguous(stdout_from=2)
    assert t.terminal["exit_code"] == 3 and t.close_code == 1000


async def test_a_watcher_is_refused_input_close_stdin_and_resize_and_reads_on(
    daemon: Daemon,
) -> None:
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client, exec_socket(daemon.ws) as watcher:
            await client.start(command="read x; echo got $x", command_id=command_id, pty=True)
            await watcher.send(type="reconnect", command_id=command_id, watch=True)
            await watcher.recv_until("started")
            for frame in (
                {"type": "input", "data": "from-watcher\n"},
                {"type": "close_stdin"},
                {"type": "resize", "cols": 10, "rows": 5},
            ):
                await watcher.send(**frame)
                error = await watcher.recv_until("error")
                assert error["error_type"] == "InvalidRequest"
                assert error["error"].startswith("read-only attachment: ")
                assert frame["type"] in error["error"]
            live = daemon.running.supervisor.sessions[command_id]
            assert live.status is None  # the command is untouched
            await client.send(type="input", data="from-client\n")
            await watcher.recv_until_text("stdout", "got from-client")
            t = await watcher.collect()
    assert "from-watcher" not in t.text("stdout")
    assert t.terminal["exit_code"] == 0 and t.close_code == 1000


async def test_a_watcher_may_signal_and_kill(daemon: Daemon) -> None:
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(
                command="trap 'echo got-int' INT; while :; do sleep 0.05; done",
                command_id=command_id,
            )
            async with exec_socket(daemon.ws) as watcher:
                await watcher.send(type="reconnect", command_id=command_id, watch=True)
                await watcher.recv_until("started")
                await trio.sleep(0.2)  # the trap is set
                await watcher.send(type="signal", signal="INT")
                await watcher.recv_until_text("stdout", "got-int")
                await watcher.send(type="kill")
                assert (await watcher.recv_until("exit"))["exit_code"] == 137
            assert (await client.recv_until("exit"))["reason"] == "killed"


async def test_a_watcher_leaving_never_triggers_kill_on_disconnect(daemon: Daemon) -> None:
    command_id = new_id()
    with trio.fail_after(10):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="sleep 60", command_id=command_id, kill_on_disconnect=True)
            live = daemon.running.supervisor.sessions[command_id]
            async with exec_socket(daemon.ws) as watcher:
                await watcher.send(type="reconnect", command_id=command_id, watch=True)
                await watcher.recv_until("started")
                assert daemon.running.supervisor.snapshot()[-1]["watchers"] == 1
                await client.stream.aclose()  # the only client drops: the command dies
                assert (await watcher.recv_until("exit"))["reason"] == "disconnect"
        command_id = new_id()
        async with exec_socket(daemon.ws) as client:
            await client.start(command="sleep 60", command_id=command_id, kill_on_disconnect=True)
            live = daemon.running.supervisor.sessions[command_id]
            for _ in range(3):
                async with exec_socket(daemon.ws) as watcher:
                    await watcher.send(type="reconnect", command_id=command_id, watch=True)
                    await watcher.recv_until("started")
            await trio.sleep(0.3)
            assert live.status is None, "a watcher leaving killed the command"
            await client.send(type="kill")
            await client.recv_until("exit")


async def test_a_watcher_does_not_keep_an_idle_command_alive(daemon: Daemon) -> None:
    command_id = new_id()
    with trio.fail_after(15):
        async with exec_socket(daemon.ws) as client:
            await client.start(command="sleep 60", command_id=command_id, idle_timeout_seconds=1)
        async with exec_socket(daemon.ws) as watcher:
            await watcher.send(type="reconnect", command_id=command_id, watch=True)
            await watcher.recv_until("started")
            exit_frame = await watcher.recv_until("exit")  # killed while it watched
    assert exit_frame["reason"] == "idle" and exit_frame["exit_code"] == 137


async def test_a_pty_command_starts_with_the_window_size_sent_in_execute(daemon: Daemon) -> None:
    with trio.fail_after(10):
        t = await run_command(daemon.ws, "stty size", pty=True, cols=101, rows=37)
    assert t.text("stdout").strip() == "37 101"


# ---- stdin order and prompt control frames (issue 13) ---------------------------------

#: Rounds of each pipelining race per test run; run the tests in a loop for more.
RACE_ROUNDS = 25
MiB = 1024 * 1024


def numbered(count: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i}," for i in range(count)]


def inputs(pieces: list[str]) -> list[dict[str, Any]]:
    return [{"type": "input", "data": piece} for piece in pieces]


def cat_frame(**fields: Any) -> dict[str, Any]:
    frame = {"type": "execute", "command": "cat; echo rc=$?", "close_stdin": False}
    frame.update(fields)
    return frame


async def pipelined(daemon: Daemon, *frames: dict[str, Any]) -> Transcript:
    """Send ``frames`` in one socket write and read everything until the close."""

    async def send() -> None:
        # Refused and closed before all was read: the transcript tells.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await ws.send_frames(*frames)

    async with raw_ws(daemon.running.address) as ws, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        return await ws.collect()


@pytest.mark.parametrize("count", [5, 20, 300])
async def test_input_pipelined_behind_execute_reaches_stdin_in_arrival_order(
    daemon: Daemon, count: int
) -> None:  # item 13 with a client that does not wait for started (§2.3)
    pieces = numbered(count)
    for _ in range(RACE_ROUNDS):
        with trio.fail_after(20):
            t = await pipelined(daemon, cat_frame(), *inputs(pieces), {"type": "close_stdin"})
        assert t.types[0] == "started", t.frames[:2]
        assert t.text("stdout") == "".join(pieces) + "rc=0\n"


async def test_input_pipelined_behind_reconnect_reaches_stdin_in_arrival_order(
    daemon: Daemon,
) -> None:
    pieces = numbered(20)
    for _ in range(RACE_ROUNDS):
        command_id = new_id()
        with trio.fail_after(20):
            async with exec_socket(daemon.ws) as first:
                await first.start(command="cat; echo rc=$?", command_id=command_id)
                reconnect = {"type": "reconnect", "command_id": command_id}
                t = await pipelined(daemon, reconnect, *inputs(pieces), {"type": "close_stdin"})
        assert t.text("stdout") == "".join(pieces) + "rc=0\n"


async def test_input_pipelined_behind_a_pty_execute_reaches_the_terminal_in_order(
    daemon: Daemon,
) -> None:
    pieces = numbered(20)
    typed = [*pieces, "\n", "\x04"]  # a line, then EOT at its start ends cat
    for _ in range(RACE_ROUNDS):
        with trio.fail_after(20):
            t = await pipelined(daemon, cat_frame(pty=True), *inputs(typed))
        # The terminal echoes the line as it arrives, then cat writes it back.
        assert re.findall(r"\d+,", t.text("stdout")) == pieces * 2, t.text("stdout")
        assert t.text("stdout").endswith("rc=0\r\n")


async def pipelined_from_two_sockets(
    daemon: Daemon, a_pieces: list[str], b_pieces: list[str]
) -> tuple[Transcript, Transcript]:
    """Socket a pipelines its input behind ``execute``, socket b behind a ``reconnect``
    sent as soon as the session exists (while a may still be binding)."""
    command_id = new_id()
    total = len("".join(a_pieces + b_pieces))
    execute = cat_frame(command=f"head -c {total}; echo; echo rc=$?", command_id=command_id)
    reconnect = {"type": "reconnect", "command_id": command_id}
    results: dict[str, Transcript] = {}

    async def first() -> None:
        results["a"] = await pipelined(daemon, execute, *inputs(a_pieces))

    async def second() -> None:
        while command_id not in daemon.running.supervisor.sessions:
            await trio.lowlevel.checkpoint()
        results["b"] = await pipelined(daemon, reconnect, *inputs(b_pieces))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
    return results["a"], results["b"]


async def test_two_sockets_pipelining_into_one_command_each_keep_their_order(
    daemon: Daemon,
) -> None:
    a_pieces, b_pieces = numbered(20, "a"), numbered(20, "b")
    for _ in range(RACE_ROUNDS):
        with trio.fail_after(20):
            a, b = await pipelined_from_two_sockets(daemon, a_pieces, b_pieces)
        out = a.text("stdout")
        assert out == b.text("stdout") and out.endswith("\nrc=0\n")
        tokens = re.findall(r"[ab]\d+,", out)
        assert [x for x in tokens if x[0] == "a"] == a_pieces, out
        assert [x for x in tokens if x[0] == "b"] == b_pieces, out


@pytest.fixture
async def busy_daemon() -> AsyncIterator[Daemon]:
    """A daemon streaming the output of 50 other commands to 50 attached clients."""
    async with running_daemon() as daemon, trio.open_nursery() as nursery:
        started = 0
        ready = trio.Event()

        async def busy() -> None:
            nonlocal started
            async with exec_socket(daemon.ws) as client:
                # Builtins only (read -t on the idle stdin is the pause): no fork per turn.
                command = "while :; do printf '%s\\n' {1..500}; read -t 0.1; done"
                await client.start(command=command, timeout_seconds=0)
                await client.recv_until("stdout")
                started += 1
                if started == 50:
                    ready.set()
                with contextlib.suppress(ConnectionClosed):  # the daemon stops first
                    while True:
                        await client.recv()
                        client.transcript.frames.clear()

        for _ in range(50):
            nursery.start_soon(busy)
        with trio.fail_after(30):
            await ready.wait()
        yield daemon
        nursery.cancel_scope.cancel()


async def test_pipelined_input_keeps_its_order_while_50_other_commands_stream(
    busy_daemon: Daemon,
) -> None:
    assert len(busy_daemon.running.supervisor.sessions) >= 50
    pieces = numbered(20)
    for _ in range(RACE_ROUNDS):
        with trio.fail_after(30):
            t = await pipelined(busy_daemon, cat_frame(), *inputs(pieces), {"type": "close_stdin"})
        assert t.text("stdout") == "".join(pieces) + "rc=0\n"


FLOOD = inputs(["x" * MiB] * 6)  # far more than a command that does not read will take


@pytest.mark.parametrize(
    ("control", "signal_name"),
    [({"type": "kill"}, "KILL"), ({"type": "signal", "signal": "INT"}, "INT")],
    ids=["kill", "signal-int"],
)
async def test_a_control_frame_behind_unwritten_input_takes_effect_at_once(
    daemon: Daemon, control: dict[str, Any], signal_name: str
) -> None:
    with trio.fail_after(25):
        start = trio.current_time()
        t = await pipelined(daemon, cat_frame(command="sleep 30"), *FLOOD, control)
        elapsed = trio.current_time() - start
    assert t.terminal["type"] == "exit" and t.terminal["signal"] == signal_name, t.terminal
    assert elapsed < 5  # "within about a second", with slack for a loaded machine


async def flood_a_raw_terminal(daemon: Daemon, command: str, control: dict[str, Any]) -> Transcript:
    """Run ``command`` on a PTY in raw mode (a full terminal then takes no more input,
    where a canonical one discards it), then send ``FLOOD`` and ``control`` in one go."""
    async with exec_socket(daemon.ws) as client, trio.open_nursery() as nursery:
        await client.start(command=f"stty raw -echo; echo ready; {command}", pty=True)
        await client.recv_until_text("stdout", "ready")

        async def burst() -> None:
            for frame in [*FLOOD, control]:
                await client.send(**frame)

        nursery.start_soon(burst)
        return await client.collect()


async def test_kill_behind_input_a_pty_command_does_not_read_takes_effect_at_once(
    daemon: Daemon,
) -> None:
    with trio.fail_after(25):
        start = trio.current_time()
        t = await flood_a_raw_terminal(daemon, "sleep 30", {"type": "kill"})
        elapsed = trio.current_time() - start
    assert t.terminal["type"] == "exit" and t.terminal["signal"] == "KILL", t.terminal
    assert elapsed < 5


async def test_resize_behind_input_a_pty_command_does_not_read_takes_effect_at_once(
    daemon: Daemon,
) -> None:
    resize = {"type": "resize", "cols": 100, "rows": 30}
    with trio.fail_after(25):
        t = await flood_a_raw_terminal(daemon, "sleep 2; stty size", resize)
    assert t.text("stdout").split()[-2:] == ["30", "100"], repr(t.text("stdout")[-40:])
    assert t.terminal["exit_code"] == 0


async def test_close_stdin_behind_a_flood_closes_after_the_bytes_before_it(
    daemon: Daemon,
) -> None:
    execute = cat_frame(command="sleep 1; wc -c")
    with trio.fail_after(25):
        t = await pipelined(daemon, execute, *FLOOD, {"type": "close_stdin"})
    assert t.text("stdout").strip() == str(6 * MiB)
    assert t.terminal["exit_code"] == 0


async def test_a_flood_past_the_stdin_cap_makes_the_sender_wait_and_another_socket_kills(
    daemon: Daemon,
) -> None:
    command_id = new_id()
    execute = cat_frame(command="sleep 30", command_id=command_id)
    sent = trio.Event()
    with trio.fail_after(25):
        async with raw_ws(daemon.running.address) as ws, trio.open_nursery() as nursery:

            async def flood() -> None:
                try:  # 64 MiB: more than the stdin cap and every buffer on the way
                    await ws.send_frames(execute, *inputs(["x" * MiB] * 64))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the daemon closed after the kill, before all was read
                sent.set()

            nursery.start_soon(flood)
            with trio.move_on_after(2):
                await sent.wait()
            assert not sent.is_set()  # the daemon stopped reading: its memory stays bounded
            reconnect = {"type": "reconnect", "command_id": command_id}
            other = await pipelined(daemon, reconnect, {"type": "kill"})
            t = await ws.collect()
    assert other.terminal["signal"] == t.terminal["signal"] == "KILL"


async def test_more_held_frames_than_the_limits_before_execute_are_refused(
    daemon: Daemon,
) -> None:
    too_many = inputs(["."] * 257)
    too_big = inputs(["x" * MiB] * 9)
    with trio.fail_after(20):
        many = await pipelined(daemon, *too_many, cat_frame())
        big = await pipelined(daemon, *too_big, cat_frame())
        held = await pipelined(daemon, *inputs(["."] * 256), cat_frame(), {"type": "close_stdin"})
    for refused in (many, big):
        assert refused.frames[0]["error_type"] == "InvalidRequest", refused.frames[:1]
        assert "before execute/reconnect" in refused.frames[0]["error"]
        assert "started" not in refused.types
    assert held.text("stdout") == "." * 256 + "rc=0\n"


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
async def test_ttl_0_sockets_attached_at_the_finish_read_every_byte_then_the_output_is_freed(
    tmp_path: pathlib.Path, pty: bool
) -> None:  # item 27 with ttl 0; README: "sockets already attached still read it to the end"
    flag = tmp_path / "go"
    size = 12_000_000  # far beyond the socket buffers
    command = (
        f"while [ ! -e {flag} ]; do sleep 0.02; done; "
        f"head -c {size} /dev/zero | tr '\\0' z; echo; echo end"
    )
    newline = "\r\n" if pty else "\n"
    expected = "z" * size + newline + "end" + newline
    command_id = new_id()
    async with running_daemon(stall_seconds=0.5) as daemon:
        supervisor = daemon.running.supervisor
        with trio.fail_after(120):
            async with (
                exec_socket(daemon.ws) as first,
                exec_socket(daemon.ws) as second,
                exec_socket(daemon.ws) as third,
                raw_ws(daemon.running.address) as dropped,
            ):
                await first.start(command=command, command_id=command_id, ttl_seconds=0, pty=pty)
                for client in (second, third):
                    await client.send(type="reconnect", command_id=command_id)
                    await client.recv_until("started")
                reconnect = json.dumps({"type": "reconnect", "command_id": command_id})
                await dropped.send(TextMessage(reconnect))
                live = supervisor.sessions[command_id]
                while len(live.core.attachments) < 4:
                    await trio.sleep(0.01)
                flag.touch()
                # Nobody reads until the command finished and its session is gone.
                while command_id in supervisor.sessions:
                    await trio.sleep(0.05)
                async with exec_socket(daemon.ws) as late:
                    await late.send(type="reconnect", command_id=command_id)
                    assert (await late.collect()).frames[0]["error_type"] == "SessionExpired"
                await dropped.stream.aclose()  # gone without reading
                transcripts = [await client.collect() for client in (first, second, third)]
            for t in transcripts:
                assert "gap" not in t.types
                t.assert_contiguous()
                assert t.text("stdout") == expected
                assert t.terminal["type"] == "exit" and t.terminal["exit_code"] == 0
            while supervisor.pool.total:  # the last reader's detach frees the output
                await trio.sleep(0.05)


@pytest.mark.parametrize("daemon_home", ["/root", None], ids=["HOME=/root", "no-HOME"])
@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
@pytest.mark.parametrize("as_other_user", [False, True], ids=["own-user", "other-user"])
async def test_home_is_the_home_directory_not_the_daemons_own(
    daemon_home: str | None,
    pty: bool,
    as_other_user: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
    request: pytest.FixtureRequest,
) -> None:
    other: OtherUser | None = request.getfixturevalue("other_user") if as_other_user else None
    if daemon_home is None:
        monkeypatch.delenv("HOME", raising=False)
    else:
        monkeypatch.setenv("HOME", daemon_home)
    monkeypatch.setenv("USER", "root")  # as a login shell that started the daemon leaves it
    monkeypatch.setenv("LOGNAME", "root")
    run_config = {"work_dir": "/", **({"user": other.name} if other else {})}
    script = 'echo "$HOME"; cd ~ && pwd; echo "$USER $LOGNAME"'
    async with running_daemon(home=str(tmp_path)) as daemon:
        with trio.fail_after(20):
            plain = await run_command(daemon.ws, script, pty=pty, run_config=run_config)
            chosen = await run_command(
                daemon.ws,
                'echo "$HOME"; echo "$USER $LOGNAME"',
                pty=pty,
                run_config={**run_config, "env_vars": {"HOME": "/elsewhere", "USER": "me"}},
            )
            legacy = await run_command(daemon.ws, 'echo "$HOME"', pty=pty, env={"HOME": "/legacy"})
    newline = "\r\n" if pty else "\n"
    home = other.home if other else str(tmp_path)
    name = other.name if other else "root"
    assert plain.text("stdout").split(newline)[:3] == [home, home, f"{name} {name}"], plain.frames
    assert chosen.text("stdout").split(newline)[:2] == ["/elsewhere", f"me {name}"]
    assert legacy.text("stdout") == f"/legacy{newline}"


KiB, MiB = 1024, 1024 * 1024


def file_writing_command(size: int) -> tuple[str, str]:
    """A command of ``size`` bytes that writes a heredoc to a file and prints its sha256."""
    head, tail = "cat > \"$F\" <<'EOF'\n", 'EOF\nsha256sum < "$F"; rm "$F"; exit 3\n'
    line = "payload " * 8 + "\n"
    body_size = size - len(head) - len(tail)
    body = (line * (body_size // len(line) + 1))[: body_size - 1] + "\n"
    return head + body + tail, hashlib.sha256(body.encode()).hexdigest()


@pytest.mark.parametrize(
    ("size", "pty"),
    [(127 * KiB, False), (128 * KiB, False), (KiB * KiB, False), (7 * MiB, False), (7 * MiB, True)],
    ids=["127K", "128K", "1M", "7M", "7M-pty"],
)
async def test_a_command_of_any_size_that_fits_a_message_runs(
    daemon: Daemon, size: int, pty: bool, tmp_path: pathlib.Path
) -> None:
    command, digest = file_writing_command(size)
    with trio.fail_after(60):
        t = await run_command(
            daemon.ws, command, pty=pty, env={"F": str(tmp_path / "f")}, timeout_seconds=50
        )
    assert t.types[0] == "started", t.frames[:2]
    assert t.text("stdout").strip() == f"{digest}  -"
    assert t.terminal["exit_code"] == 3


# ---- the drain after the leader exits ------------------------------------------------


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
async def test_output_held_back_for_a_lingering_client_is_read_after_the_leader_exits(
    pty: bool,
) -> None:
    # The only client leaves before reading: its cursor lingers and paces the command for
    # --stall-seconds, so the tail waits in the pipe while the leader exits. The bounded
    # drain after the exit is for a left-behind child that holds the pipe, not for
    # output held back by pacing: every byte must still reach the ring.
    command_id = new_id()
    newline = "\r\n" if pty else "\n"
    async with running_daemon(ring_bytes=131072, stall_seconds=2.5, drain_seconds=0.5) as daemon:
        with trio.fail_after(30):
            async with exec_socket(daemon.ws) as leaving:
                await leaving.start(
                    command="sleep 0.3; printf 'first\\n'; sleep 0.3; printf 'last\\n'",
                    command_id=command_id,
                    pty=pty,
                )
            live = daemon.running.supervisor.sessions[command_id]
            await live.reaped.wait()
            while live.core.state is SessionState.RUNNING:
                await live.wait_changed()
            async with exec_socket(daemon.ws) as back:
                await back.send(type="reconnect", command_id=command_id)
                t = await back.collect()
    assert t.text("stdout") == f"first{newline}last{newline}"
    assert "gap" not in t.types and t.terminal["exit_code"] == 0
