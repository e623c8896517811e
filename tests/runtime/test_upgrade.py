"""Live upgrade of a real daemon process: commands keep running across re-execs in place,
every byte arrives exactly once, exit codes are exact, refusals and rollbacks change
nothing. (The 20-upgrade SDK soak, PID 1, the single-file build and the benchmark are
in the whole-daemon tests.)"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import h11
import psutil
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from tests.helpers import exec_socket, http_request, is_spawner_helper
from tests.sdk.conftest import DaemonProcess, daemon_process

FAULT = "SANDBOXD_TEST_UPGRADE_FAULT"

#: Interleaved stdout/stderr with pauses: about 2.5 s.
PIPE = (
    'for i in $(seq 1 2500); do echo "out $i"; echo "err $i" >&2; '
    "if [ $((i % 100)) = 0 ]; then sleep 0.3; fi; done"
)
PIPE_OUT = "".join(f"out {i}\n" for i in range(1, 2501))
PIPE_ERR = "".join(f"err {i}\n" for i in range(1, 2501))
#: The same, 800 lines (about 2.4 s): running across one refused or rolled-back upgrade.
SHORT_PIPE = PIPE.replace("seq 1 2500", "seq 1 800")
SHORT_OUT = "".join(f"out {i}\n" for i in range(1, 801))
SHORT_ERR = "".join(f"err {i}\n" for i in range(1, 801))
#: A PTY command (its newlines become CRLF).
PTY = 'for i in $(seq 1 2000); do echo "pty $i"; if [ $((i % 80)) = 0 ]; then sleep 0.3; fi; done'
PTY_OUT = "".join(f"pty {i}\r\n" for i in range(1, 2001))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_RETRYABLE = (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_retryable(e) for e in exc.exceptions)
    return isinstance(exc, _RETRYABLE)


@dataclass
class Follower:
    """A raw client that follows one command to its end, reattaching at its offsets
    whenever its socket closes without ``exit`` (as the SDKs do on 1001)."""

    address: str
    execute: dict[str, Any]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    closes: list[int | None] = field(default_factory=list)
    terminal: dict[str, Any] | None = None
    command_id: str | None = None
    pause: float = 0.0  # after each output frame (a slow reader)

    async def run(self) -> None:
        while self.terminal is None:
            try:
                await self._once()
            except BaseException as exc:
                if not _retryable(exc):
                    raise
                await trio.sleep(0.05)  # a 503 or a dropped handshake during a swap: retry

    async def _once(self) -> None:
        async with exec_socket(f"ws://{self.address}/execute/ws") as client:
            if self.command_id is None:
                await client.send(type="execute", **self.execute)
            else:
                await client.send(
                    type="reconnect",
                    command_id=self.command_id,
                    stdout_offset=self.offsets["stdout"],
                    stderr_offset=self.offsets["stderr"],
                )
            try:
                while True:
                    frame = await client.recv()
                    kind = frame["type"]
                    if kind == "started":
                        self.command_id = frame["command_id"]
                    elif kind in ("stdout", "stderr"):
                        assert frame["offset"] == self.offsets[kind], (kind, frame["offset"])
                        self.offsets[kind] += len(frame["data"].encode())
                        (self.out if kind == "stdout" else self.err).append(frame["data"])
                        await trio.sleep(self.pause)
                    elif kind in ("exit", "error"):
                        self.terminal = frame
                        return
            except ConnectionClosed as closed:
                self.closes.append(closed.reason.code)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


async def healthz(address: str) -> dict[str, Any]:
    while True:
        try:
            response = await http_request(address, "GET", "/healthz")
        except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError):
            # A poll cut by the exec itself: a connection accepted just before the
            # upgrade closed the HTTP side can still be closed with no answer (a known
            # race, see docs/operations.md); the SDKs' own requests retry.
            await trio.sleep(0.05)
            continue
        if response.status == 200:
            result: dict[str, Any] = response.json()
            return result
        await trio.sleep(0.05)


async def wait_generation(address: str, generation: int) -> dict[str, Any]:
    while True:
        health = await healthz(address)
        if health["generation"] >= generation:
            return health
        await trio.sleep(0.05)


async def wait_last_upgrade(address: str, result: str) -> dict[str, Any]:
    while True:
        health = await healthz(address)
        last = health["last_upgrade"]
        if last is not None and last["result"] == result:
            return health
        await trio.sleep(0.05)


async def post_upgrade(address: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/octet-stream"} if body else {}
    response = await http_request(address, "POST", "/admin/upgrade", body, headers)
    return response.status, json.loads(response.body)


@pytest.fixture
def daemon_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(FAULT, raising=False)
    yield monkeypatch


@contextmanager
def _explained(daemon: DaemonProcess, followers: Sequence[Follower]) -> Iterator[None]:
    """On a failure, print where each follower got to and the daemon's last log lines."""
    try:
        yield
    except BaseException:
        for follower in followers:
            print(
                "follower",
                follower.execute.get("command", "")[:30],
                follower.offsets,
                follower.closes,
                follower.terminal,
            )
        for entry in daemon.logs:
            if "healthz" not in str(entry):
                print(entry)
        raise


async def _three_upgrades(daemon: DaemonProcess, followers: Sequence[Follower]) -> None:
    pipe, pty, quick, killed = followers
    address = daemon.address
    async with trio.open_nursery() as nursery:
        for follower in (pipe, pty):
            nursery.start_soon(follower.run)
        await trio.sleep(0.3)
        for generation in (1, 2, 3):
            if generation == 2:
                # these two end while the upgrade is under way
                nursery.start_soon(quick.run)
                nursery.start_soon(killed.run)
                await trio.sleep(0.1)
            if generation == 3:
                status, body = await post_upgrade(address)
                assert status == 202, body
                assert body["generation"] == 3
            else:
                daemon.process.send_signal(signal.SIGUSR2)
            health = await wait_generation(address, generation)
            assert health["generation"] == generation
            assert health["pid"] == daemon.process.pid
            assert health["last_upgrade"]["result"] == "ok"
            assert health["last_upgrade"]["swap_ms"] > 0
            await trio.sleep(0.3)


async def test_pipe_and_pty_commands_stream_byte_exact_across_three_upgrades(
    daemon_env: pytest.MonkeyPatch,
) -> None:
    with daemon_process("--stop-grace", "1", "--home", "/tmp") as daemon:
        address = daemon.address
        first = await healthz(address)
        assert first["generation"] == 0 and first["last_upgrade"] is None
        assert first["pid"] == daemon.process.pid
        pipe = Follower(address, {"command": PIPE, "close_stdin": True})
        pty = Follower(address, {"command": PTY, "pty": True})
        quick = Follower(address, {"command": "sleep 0.3; exit 7", "close_stdin": True})
        killed = Follower(address, {"command": "sleep 0.4; kill -9 $$", "close_stdin": True})
        followers = (pipe, pty, quick, killed)
        with _explained(daemon, followers), trio.fail_after(90):
            await _three_upgrades(daemon, followers)
        assert sha(pipe.stdout) == sha(PIPE_OUT)
        assert sha(pipe.stderr) == sha(PIPE_ERR)
        assert sha(pty.stdout) == sha(PTY_OUT)
        assert pipe.terminal is not None and pipe.terminal["exit_code"] == 0
        assert pty.terminal is not None and pty.terminal["exit_code"] == 0
        assert quick.terminal is not None and quick.terminal["exit_code"] == 7
        assert killed.terminal is not None and killed.terminal["exit_code"] == 137
        assert killed.terminal["signal"] == "KILL"
        assert 1001 in pipe.closes + pty.closes  # the upgrades really closed them
        # a replay from offset 0 afterwards is the same
        replay = Follower(address, {})
        replay.command_id = pipe.command_id
        with trio.fail_after(30):
            await replay.run()
        assert sha(replay.stdout) == sha(PIPE_OUT) and sha(replay.stderr) == sha(PIPE_ERR)
        # Each new image started its own spawner helper and collected the old one (a
        # zombie by then), which is not an orphan: three upgrades, one helper, no orphan.
        assert (await healthz(address))["orphans_reaped"] == 0
        helpers = [p for p in psutil.Process(daemon.process.pid).children() if is_spawner_helper(p)]
        assert len(helpers) == 1, helpers
    upgrades = [e for e in daemon.logs if e.get("msg") == "upgrade"]
    assert [e["result"] for e in upgrades] == ["ok", "ok", "ok"]


async def test_queued_stdin_and_timers_cross_an_upgrade(daemon_env: pytest.MonkeyPatch) -> None:
    with daemon_process("--stop-grace", "1", "--home", "/tmp") as daemon:
        address = daemon.address
        with trio.fail_after(60):
            async with exec_socket(f"ws://{address}/execute/ws") as client:
                # The command reads nothing for 2 s: 64 KiB fit in the pipe, the rest of
                # the 300000 bytes is still queued in the daemon when it upgrades.
                reader = await client.start(command="sleep 2; wc -c")
                for _ in range(30):
                    await client.send(type="input", data="x" * 10_000)
                await client.send(type="close_stdin")
            async with exec_socket(f"ws://{address}/execute/ws") as client:
                timed = await client.start(command="sleep 30", timeout_seconds=3)
            daemon.process.send_signal(signal.SIGUSR2)
            await wait_generation(address, 1)
            async with exec_socket(f"ws://{address}/execute/ws") as client:
                await client.send(type="reconnect", command_id=reader["command_id"])
                transcript = await client.collect()
            assert transcript.text("stdout").strip() == "300000"
            assert transcript.terminal["exit_code"] == 0
            async with exec_socket(f"ws://{address}/execute/ws") as client:
                await client.send(type="reconnect", command_id=timed["command_id"])
                transcript = await client.collect()
            # the timeout (3 s after its start, before the upgrade) fired in the new image
            assert transcript.terminal["type"] == "error"
            assert transcript.terminal["error_type"] == "CommandTimeout"
    assert [e["result"] for e in daemon.logs if e.get("msg") == "upgrade"] == ["ok"]


async def test_a_second_trigger_during_an_upgrade_is_refused_with_409(
    daemon_env: pytest.MonkeyPatch,
) -> None:
    with daemon_process("--stop-grace", "1") as daemon:
        address = daemon.address
        with trio.fail_after(60):
            results: list[tuple[int, dict[str, Any]]] = []

            async def trigger() -> None:
                results.append(await post_upgrade(address))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trigger)
                nursery.start_soon(trigger)
            statuses = sorted(status for status, _ in results)
            assert statuses == [202, 409], results
            refusal = next(body for status, body in results if status == 409)
            assert refusal["error"] == "UpgradeRefused"
            assert "another upgrade" in refusal["message"]
            health = await wait_generation(address, 1)
            assert health["generation"] == 1


async def _running_command(address: str) -> Follower:
    follower = Follower(address, {"command": SHORT_PIPE, "close_stdin": True})
    return follower


@pytest.mark.parametrize("fault", ["corrupt", "truncate", "newer-schema", "other-pid"])
async def test_a_damaged_state_is_refused_before_the_swap_and_nothing_changes(
    daemon_env: pytest.MonkeyPatch, fault: str
) -> None:
    daemon_env.setenv(FAULT, fault)
    with daemon_process("--stop-grace", "1", "--home", "/tmp") as daemon:
        address = daemon.address
        with trio.fail_after(60):
            pipe = await _running_command(address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe.run)
                await trio.sleep(0.3)
                status, body = await post_upgrade(address)
                assert status == 409, body
                assert "pre-flight" in body["message"]
                health = await healthz(address)
                assert health["generation"] == 0
                assert health["last_upgrade"]["result"] == "refused"
            assert pipe.closes == []  # the client was never touched
            assert sha(pipe.stdout) == sha(SHORT_OUT) and sha(pipe.stderr) == sha(SHORT_ERR)


@pytest.mark.parametrize("fault", ["skip-preflight,corrupt", "fail-resume"])
async def test_a_new_image_that_refuses_the_state_rolls_back_with_everything(
    daemon_env: pytest.MonkeyPatch, fault: str
) -> None:
    daemon_env.setenv(FAULT, fault)
    with daemon_process("--stop-grace", "1", "--home", "/tmp") as daemon:
        address = daemon.address
        with trio.fail_after(60):
            pipe = await _running_command(address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe.run)
                await trio.sleep(0.3)
                status, body = await post_upgrade(address)
                assert status == 202, body
                health = await wait_last_upgrade(address, "rolled_back")
                assert health["generation"] == 0
                assert health["pid"] == daemon.process.pid
            assert sha(pipe.stdout) == sha(SHORT_OUT) and sha(pipe.stderr) == sha(SHORT_ERR)
            assert pipe.terminal is not None and pipe.terminal["exit_code"] == 0


async def test_no_upgrade_refuses_both_triggers(daemon_env: pytest.MonkeyPatch) -> None:
    with daemon_process("--stop-grace", "1", "--no-upgrade") as daemon:
        with trio.fail_after(30):
            status, body = await post_upgrade(daemon.address)
            assert status == 409 and "--no-upgrade" in body["message"]
            daemon.process.send_signal(signal.SIGUSR2)
            await trio.sleep(0.5)
            health = await healthz(daemon.address)
            assert health["generation"] == 0


async def test_a_sigterm_in_the_exec_window_ends_in_a_graceful_stop(
    daemon_env: pytest.MonkeyPatch,
) -> None:
    daemon_env.setenv(FAULT, "exec-window-sleep=1.0")
    with daemon_process("--stop-grace", "1") as daemon:
        with trio.fail_after(60):
            async with exec_socket(f"ws://{daemon.address}/execute/ws") as client:
                await client.start(command="sleep 60")
            daemon.process.send_signal(signal.SIGUSR2)
            while not any(e.get("msg") == "upgrade exec" for e in daemon.logs):
                await trio.sleep(0.02)
            daemon.process.send_signal(signal.SIGTERM)  # blocked: pending across the exec
            code = await trio.to_thread.run_sync(daemon.process.wait, 30)
            assert code == 0
    messages = [e.get("msg") for e in daemon.logs]
    # the new image came up, then acted on the pending TERM: a graceful stop
    assert messages.index("upgrade exec") < messages.index("upgrade") < messages.index("stopping")
    assert "stopped" in messages


@pytest.mark.parametrize("back", [True, False])
async def test_kill_on_disconnect_waits_for_a_client_the_upgrade_closed(
    daemon_env: pytest.MonkeyPatch, back: bool
) -> None:
    with daemon_process("--stop-grace", "1", "--upgrade-grace", "3") as daemon:
        address = daemon.address
        with trio.fail_after(60):
            async with exec_socket(f"ws://{address}/execute/ws") as client:
                started = await client.start(command="sleep 60", kill_on_disconnect=True)
                daemon.process.send_signal(signal.SIGUSR2)
                closed = await client.collect()
            assert closed.close_code == 1001
            await wait_generation(address, 1)
            if back:
                async with exec_socket(f"ws://{address}/execute/ws") as client:
                    await client.send(type="reconnect", command_id=started["command_id"])
                    await client.recv_until("started")
                    await trio.sleep(3.5)  # past the grace, still attached: still running
                    sessions = (await http_request(address, "GET", "/sessions")).json()
                    assert sessions["sessions"][0]["state"] == "running"
                    await client.send(type="kill")
                    transcript = await client.collect()
                assert transcript.terminal["reason"] == "killed"
            else:
                await trio.sleep(4)  # nobody came back within the 3 s grace
                async with exec_socket(f"ws://{address}/execute/ws") as client:
                    await client.send(type="reconnect", command_id=started["command_id"])
                    transcript = await client.collect()
                assert transcript.terminal["reason"] == "disconnect"


async def test_the_upgrade_verb_returns_once_the_new_image_serves(
    daemon_env: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    with daemon_process("--stop-grace", "1") as daemon:
        with trio.fail_after(60):
            verb = [sys.executable, "-m", "sandboxd", "--url", f"http://{daemon.address}"]
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run([*verb, "upgrade"], capture_output=True, text=True)
            )
            assert done.returncode == 0, done.stderr
            assert (await healthz(daemon.address))["generation"] == 1


async def test_an_expired_session_a_client_still_reads_is_carried_to_its_end(
    daemon_env: pytest.MonkeyPatch,
) -> None:
    """ttl 0: the session leaves the registry as its command ends, while its slow client
    has most of the output still to read; after the upgrade that client reconnects at
    its offsets and reads every byte and the exit (a stranger gets SessionExpired)."""
    size = 8_000_000
    command = f"head -c {size} /dev/zero | tr '\\0' a"
    with daemon_process("--stop-grace", "1") as daemon:
        address = daemon.address
        with trio.fail_after(90), _explained(daemon, []):
            reader = Follower(
                address, {"command": command, "close_stdin": True, "ttl_seconds": 0}, pause=1.0
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.run)
                await trio.sleep(1.5)  # the command ended and its session expired
                assert reader.command_id is not None
                assert reader.offsets["stdout"] < size // 2
                daemon.process.send_signal(signal.SIGUSR2)
                await wait_generation(address, 1)
                reader.pause = 0.0
            # (1006 when the close frame did not fit the unread socket buffer)
            assert reader.closes and set(reader.closes) <= {1001, 1006}, reader.closes
            assert reader.terminal is not None and reader.terminal["type"] == "exit", (
                reader.terminal
            )
            assert reader.terminal["exit_code"] == 0
            assert reader.stdout == "a" * size
            stranger = Follower(address, {})
            stranger.command_id = reader.command_id
            await stranger.run()
            assert stranger.terminal is not None
            assert stranger.terminal.get("error_type") == "SessionExpired"


def _relays_of(daemon_pid: int) -> set[int]:
    """The PTY relays running under the daemon (runtime/spawn.py, "PTY relays")."""
    import psutil

    found = set()
    for child in psutil.Process(daemon_pid).children():
        with suppress(psutil.Error):
            if child.cmdline() == ["sandboxd-pty-relay"]:
                found.add(child.pid)
    return found


async def _typed(address: str, command_id: str, offset: int, keys: str, until: str) -> int:
    """Reattach at ``offset``, type ``keys``, read until ``until`` is in what came since;
    the new offset."""
    async with exec_socket(f"ws://{address}/execute/ws") as client:
        await client.send(type="reconnect", command_id=command_id, stdout_offset=offset)
        await client.recv_until("started")
        await client.send(type="input", data=keys)
        await client.recv_until_text("stdout", until)
        return offset + len(client.transcript.text("stdout").encode())


async def test_a_pty_session_keeps_its_terminal_and_its_relays_across_an_upgrade(
    daemon_env: pytest.MonkeyPatch,
) -> None:
    command = 'while read -r line; do [ "$line" = size ] && stty size; echo "got $line"; done'
    with daemon_process("--stop-grace", "1") as daemon, trio.fail_after(60):
        address = daemon.address
        async with exec_socket(f"ws://{address}/execute/ws") as client:
            started = await client.start(command=command, pty=True, cols=80, rows=24)
            await client.send(type="input", data="one\n")
            await client.recv_until_text("stdout", "got one")
            offset = len(client.transcript.text("stdout").encode())
        command_id = started["command_id"]
        relays = _relays_of(daemon.process.pid)
        assert len(relays) == 1  # the output relay (the daemon writes the master itself)
        daemon.process.send_signal(signal.SIGUSR2)
        health = await wait_generation(address, 1)
        assert health["last_upgrade"]["result"] == "ok"
        # The same relays carry on; input typed now reaches the command, a resize too.
        assert _relays_of(daemon.process.pid) == relays
        offset = await _typed(address, command_id, offset, "two\n", "got two")
        async with exec_socket(f"ws://{address}/execute/ws") as client:
            await client.send(type="reconnect", command_id=command_id, stdout_offset=offset)
            await client.recv_until("started")
            await client.send(type="resize", cols=101, rows=37)
            await client.send(type="input", data="size\n")
            await client.recv_until_text("stdout", "got size")
            assert "37 101" in client.transcript.text("stdout")
            await client.send(type="input", data="\x04")  # EOT: read ends, so does the loop
            end = await client.recv_until("exit")
        assert end["exit_code"] == 0
        while _relays_of(daemon.process.pid):
            await trio.sleep(0.05)
