"""The released Python SDK (langsmith==0.14.17), unmodified, against a real sandboxd.

Sync tests call the SDK directly; async ones run the SDK's asyncio client with
``asyncio.run``. Every test is bounded by ``faulthandler_timeout`` and by the SDK's own
timeouts, and each command carries its own ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from langsmith.sandbox import (
    CommandTimeoutError,
    Sandbox,
    SandboxOperationError,
)

from tests.sdk.conftest import API, DaemonProcess, async_sdk_sandbox, sdk_sandbox

pytestmark = pytest.mark.sdk


@pytest.fixture
def sandbox(sandboxd: DaemonProcess) -> Sandbox:
    return sdk_sandbox(sandboxd.url)


def test_run_returns_stdout_stderr_and_exit_code(sandbox: Sandbox) -> None:
    result = sandbox.run("echo héllo; echo warn >&2; exit 3", timeout=10)
    assert (result.stdout, result.stderr, result.exit_code) == ("héllo\n", "warn\n", 3)


def test_large_multibyte_output_arrives_exactly(sandbox: Sandbox) -> None:
    result = sandbox.run(
        "python3 -c \"import sys; sys.stdout.write('é😀x' * 1000000)\"", timeout=60
    )
    assert result.stdout == "é😀x" * 1_000_000
    assert result.exit_code == 0


def test_callbacks_receive_every_chunk_as_it_arrives(sandbox: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    result = sandbox.run(
        "for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.1; done",
        on_stdout=out.append,
        on_stderr=err.append,
        timeout=10,
    )
    assert "".join(out) == "1\n2\n3\n" and "".join(err) == "e1\ne2\ne3\n"
    assert len(out) >= 2  # streamed, not delivered at the end in one piece
    assert result.exit_code == 0


def test_handle_streams_takes_input_and_closes_input(sandbox: Sandbox) -> None:
    handle = sandbox.run("cat; echo done", wait=False, close_input=False, timeout=10)
    handle.send_input("line one\n")
    handle.send_input("line two\n")
    handle.close_input()
    chunks = list(handle)
    text = "".join(c.data for c in chunks if c.stream == "stdout")
    assert text == "line one\nline two\ndone\n"
    assert handle.result.exit_code == 0
    assert handle.command_id and handle.pid


def test_kill_ends_the_command_and_its_children(sandbox: Sandbox) -> None:
    handle = sandbox.run("sleep 100 & echo $!; wait", wait=False, timeout=30)
    first = next(iter(handle))
    child = psutil.Process(int(first.data))
    deadline = time.monotonic() + 5
    while child.name() != "sleep" and time.monotonic() < deadline:
        time.sleep(0.01)  # `$!` is the forked shell until it has exec'd sleep
    assert child.name() == "sleep"
    handle.kill()
    # The SDK closes its socket right after kill; a fresh reattach sees the exit.
    again = sandbox.reconnect(handle.command_id or "")
    assert again.result.exit_code == 137
    with contextlib.suppress(psutil.NoSuchProcess):  # the daemon reaps it: gone, not a zombie
        child.wait(timeout=5)
    assert not child.is_running()


def test_kill_after_input_the_command_does_not_read_takes_effect_at_once(
    sandbox: Sandbox,
) -> None:
    handle = sandbox.run("sleep 30", wait=False, close_input=False, timeout=60)
    start = time.monotonic()
    for _ in range(6):
        handle.send_input("x" * 2**20)
    handle.kill()
    again = sandbox.reconnect(handle.command_id or "")
    assert again.result.exit_code == 137
    assert time.monotonic() - start < 10  # not the 30 s of the command


def test_reconnect_from_offsets_replays_without_gap_or_overlap(sandbox: Sandbox) -> None:
    handle = sandbox.run("echo one; sleep 0.5; echo two; exit 4", wait=False, timeout=10)
    first = next(iter(handle))
    assert first.data == "one\n"
    command_id = handle.command_id or ""
    resumed = sandbox.reconnect(command_id, stdout_offset=handle.last_stdout_offset)
    assert resumed.result.stdout == "two\n"
    assert resumed.result.exit_code == 4
    whole = sandbox.reconnect(command_id)
    assert whole.result.stdout == "one\ntwo\n"


def test_reconnect_from_another_process(sandbox: Sandbox, sandboxd: DaemonProcess) -> None:
    handle = sandbox.run("echo first; sleep 1; echo second", wait=False, timeout=10)
    assert next(iter(handle)).data == "first\n"
    script = textwrap.dedent(
        f"""
        from langsmith.sandbox import Sandbox, SandboxClient
        client = SandboxClient(api_key="k", api_endpoint="{API}", max_retries=0)
        sb = Sandbox.from_dict({{"name": "x", "dataplane_url": "{sandboxd.url}"}},
                               client=client, auto_delete=False)
        h = sb.reconnect("{handle.command_id}", stdout_offset={handle.last_stdout_offset})
        print(repr(h.result.stdout), h.result.exit_code)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "'second\\n' 0"


def test_pty_gives_a_terminal(sandbox: Sandbox) -> None:
    result = sandbox.run("test -t 0 && test -t 1 && echo is-a-tty; echo err >&2", pty=True)
    assert result.stdout == "is-a-tty\r\nerr\r\n"
    assert result.exit_code == 0
    handle = sandbox.run("cat", pty=True, wait=False, timeout=10)
    handle.send_input("typed\n")
    handle.send_input("\x04")
    assert "typed" in handle.result.stdout
    assert handle.result.exit_code == 0


def test_timeout_raises_command_timeout_error(sandbox: Sandbox) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeoutError):
        sandbox.run("sleep 30", timeout=1)
    assert time.monotonic() - start < 5


def test_idle_timeout_kills_a_command_nobody_watches(sandbox: Sandbox) -> None:
    handle = sandbox.run("echo up; sleep 60", wait=False, idle_timeout=1, timeout=30)
    assert next(iter(handle)).data == "up\n"
    command_id = handle.command_id or ""
    del handle
    gc.collect()  # the handle's socket closes: no client is attached any more
    time.sleep(2.5)
    result = sandbox.reconnect(command_id).result
    assert result.exit_code == 137


def test_ttl_expiry_makes_reconnect_raise(sandbox: Sandbox) -> None:
    handle = sandbox.run("echo kept", wait=False, ttl_seconds=1, timeout=10)
    assert handle.result.stdout == "kept\n"
    command_id = handle.command_id or ""
    assert sandbox.reconnect(command_id).result.stdout == "kept\n"
    time.sleep(2)
    with pytest.raises(SandboxOperationError, match="expired"):
        sandbox.reconnect(command_id).result  # noqa: B018


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_ttl_0_run_returns_the_whole_output(sandbox: Sandbox, pty: bool) -> None:
    # 12 MB: far more than the socket buffers hold when the command finishes.
    command = "head -c 12000000 /dev/zero | tr '\\0' z; echo; echo end"
    result = sandbox.run(command, ttl_seconds=0, pty=pty, timeout=60)
    newline = "\r\n" if pty else "\n"
    assert result.stdout == "z" * 12_000_000 + newline + "end" + newline
    assert result.exit_code == 0


def test_kill_on_disconnect_when_the_client_process_dies(
    sandbox: Sandbox, sandboxd: DaemonProcess
) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from langsmith.sandbox import Sandbox, SandboxClient
        client = SandboxClient(api_key="k", api_endpoint="{API}", max_retries=0)
        sb = Sandbox.from_dict({{"name": "x", "dataplane_url": "{sandboxd.url}"}},
                               client=client, auto_delete=False)
        h = sb.run("echo alive; sleep 60", wait=False, kill_on_disconnect=True, timeout=60)
        print(h.command_id, next(iter(h)).data.strip(), flush=True)
        os._exit(0)  # no close handshake: the TCP connection just drops
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    command_id, word = out.stdout.split()
    assert word == "alive"
    time.sleep(1.5)
    result = sandbox.reconnect(command_id).result
    assert result.exit_code == 137


def test_run_config_and_legacy_env_cwd(sandbox: Sandbox) -> None:
    modern = sandbox.run(
        "id -un; pwd; echo $A",
        run_config={"user": "nobody", "work_dir": "/tmp", "env_vars": {"A": "1"}},
        timeout=10,
    )
    assert modern.stdout == "nobody\n/tmp\n1\n"
    legacy = sandbox.run("pwd; echo $A", env={"A": "2"}, cwd="/usr", timeout=10)
    assert legacy.stdout == "/usr\n2\n"


def test_spawn_failure_raises_without_retrying(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxOperationError, match="work dir"):
        sandbox.run("true", cwd="/no/such/dir", timeout=10)


def test_async_client_runs_streams_kills_and_reconnects(sandboxd: DaemonProcess) -> None:
    async def scenario() -> None:
        sb = async_sdk_sandbox(sandboxd.url)
        result = await sb.run("echo async; exit 2", timeout=10)
        assert (result.stdout, result.exit_code) == ("async\n", 2)

        seen: list[str] = []
        result = await sb.run("echo a; echo b", on_stdout=seen.append, timeout=10)
        assert "".join(seen) == "a\nb\n"

        handle = await sb.run("cat", wait=False, close_input=False, timeout=10)
        await handle.send_input("to cat\n")
        await handle.close_input()
        assert (await handle.result).stdout == "to cat\n"

        handle = await sb.run("echo x; sleep 60", wait=False, timeout=30)
        async for chunk in handle:
            assert chunk.data == "x\n"
            break
        await handle.kill()
        again = await sb.reconnect(handle.command_id or "")
        assert (await again.result).exit_code == 137

        with pytest.raises(CommandTimeoutError):
            await sb.run("sleep 30", timeout=1)

        result = await sb.run("test -t 1 && echo tty", pty=True, timeout=10)
        assert result.stdout == "tty\r\n"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "size", [127 * 1024, 128 * 1024, 1024 * 1024, 7 * 1024 * 1024], ids=["127K", "128K", "1M", "7M"]
)
def test_an_agent_writes_a_large_file_through_a_heredoc(sandbox: Sandbox, size: int) -> None:
    head, tail = "f=$(mktemp); cat > \"$f\" <<'EOF'\n", 'EOF\nsha256sum < "$f"; rm "$f"\n'
    line = "print('hello from a generated app')\n"
    body_size = size - len(head) - len(tail)
    body = (line * (body_size // len(line) + 1))[: body_size - 1] + "\n"
    command = head + body + tail
    assert len(command.encode()) == size
    result = sandbox.run(command, timeout=60)
    assert (result.stdout, result.exit_code) == (
        f"{hashlib.sha256(body.encode()).hexdigest()}  -\n",
        0,
    )
