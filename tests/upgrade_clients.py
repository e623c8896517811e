"""The clients of the live-upgrade tests: the released Python and TypeScript SDKs
streaming commands, a raw client that reattaches by itself, and a replay from offset 0."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.upgrade_helpers import Command, StreamDigest


def start_thread(function: Callable[..., object], *args: object) -> threading.Thread:
    """``function(*args)`` in a daemon thread, started."""
    thread = threading.Thread(target=function, args=args, daemon=True)
    thread.start()
    return thread


# ---- clients -------------------------------------------------------------------------------


@dataclass
class ClientResult:
    """What one client collected of one command."""

    key: str
    command_id: str | None = None
    pid: int | None = None
    streams: dict[str, StreamDigest] = field(
        default_factory=lambda: {"stdout": StreamDigest(), "stderr": StreamDigest()}
    )
    exit_code: int | None = None
    error: str | None = None
    started: threading.Event = field(default_factory=threading.Event)


def python_sdk_stream(url: str, command: Command, result: ClientResult, timeout: int = 600) -> None:
    """Run ``command`` through the released Python SDK (``run(wait=False)`` and iterate its
    handle, which reattaches by itself), filling ``result``; anything raised to user code
    is recorded in ``result.error``. Meant for a thread."""
    from tests.sdk.conftest import sdk_sandbox

    try:
        handle = sdk_sandbox(url).run(command.command, wait=False, timeout=timeout, pty=command.pty)
        result.command_id = handle.command_id
        result.pid = getattr(handle, "pid", None)
        result.started.set()
        for chunk in handle:
            result.streams[chunk.stream].update(chunk.data.encode())
        result.exit_code = handle.result.exit_code
    except Exception as error:  # the test reports what the SDK raised
        result.error = f"{type(error).__name__}: {error}"
    finally:
        result.started.set()


TS_DIR = Path(__file__).parent / "sdk" / "ts"


@dataclass
class TsClients:
    """One node process streaming several commands through the released TypeScript SDK
    (tests/sdk/ts/upgrade.mjs); ``results`` fill in as it reports."""

    process: Any
    results: dict[str, ClientResult]
    reader: threading.Thread

    @classmethod
    def start(cls, url: str, commands: Sequence[Command], timeout: int = 600) -> TsClients:
        import shutil
        import subprocess

        node = shutil.which("node")
        assert node is not None, "node is needed (make test installs it)"
        spec = [
            {"key": c.key, "command": c.command, "pty": c.pty, "timeout": timeout} for c in commands
        ]
        process = subprocess.Popen(
            [node, "upgrade.mjs", url, json.dumps(spec)],
            cwd=TS_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        results = {c.key: ClientResult(c.key) for c in commands}

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                event = json.loads(line)
                result = results[event["key"]]
                if event["event"] == "started":
                    result.command_id, result.pid = event["id"], event["pid"]
                    result.started.set()
                    continue
                for stream in ("stdout", "stderr"):
                    got = result.streams[stream]
                    got.length = event[stream]["length"]
                    got.tail = event[stream]["tail"].encode()
                    got.sha = _Fixed(event[stream]["sha256"])
                result.exit_code = event["exit_code"]
                result.error = event["error"]
                result.started.set()
            for result in results.values():
                result.started.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        return cls(process, results, reader)

    def close(self) -> None:
        """Kill the node process if it still runs (a test that failed early)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def wait(self, timeout: float) -> str:
        """Wait for the node process to end; its stderr."""
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        assert self.process.stderr is not None and self.process.stdout is not None
        text = str(self.process.stderr.read())
        self.process.stderr.close()
        self.process.stdout.close()
        return text


@dataclass
class _Fixed:
    """A finished digest reported by another process."""

    value: str

    def hexdigest(self) -> str:
        return self.value


async def replay(ws_url: str, command_id: str) -> tuple[dict[str, StreamDigest], int | None]:
    """Reattach to ``command_id`` from offset 0 with a raw client and read to its end:
    what it replayed, per stream, and the exit code (None: it ended with an error)."""
    from tests.helpers import exec_socket

    streams = {"stdout": StreamDigest(), "stderr": StreamDigest()}
    async with exec_socket(ws_url) as client:
        await client.send(type="reconnect", command_id=command_id, stdout_offset=0, stderr_offset=0)
        expect = {"stdout": 0, "stderr": 0}
        while True:
            frame = await client.recv()
            client.transcript.frames.clear()  # 50 MB of frames need not stay in memory
            if frame["type"] in streams:
                assert frame["offset"] == expect[frame["type"]], frame["offset"]
                data = frame["data"].encode()
                expect[frame["type"]] += len(data)
                streams[frame["type"]].update(data)
            elif frame["type"] == "exit":
                return streams, int(frame["exit_code"])
            elif frame["type"] == "error":
                return streams, None
            else:
                assert frame["type"] == "started", frame  # a gap: the ring lost bytes


def _connection_errors() -> tuple[type[BaseException], ...]:
    import trio
    from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

    return (OSError, trio.BrokenResourceError, ConnectionClosed, ConnectionRejected, HandshakeError)


_CONNECTION_ERRORS = _connection_errors()


@dataclass
class Follower:
    """A raw client that runs one command and follows it to its end, reattaching at once
    by ``command_id`` at its offsets whenever the daemon closes the socket (as the TS SDK
    does on 1001); ``closes`` lists the close codes it saw before the end."""

    ws_url: str
    command: Command
    fields: dict[str, Any] = field(default_factory=dict)
    streams: dict[str, StreamDigest] = field(
        default_factory=lambda: {"stdout": StreamDigest(), "stderr": StreamDigest()}
    )
    command_id: str | None = None
    pid: int | None = None
    closes: list[int | None] = field(default_factory=list)
    terminal: dict[str, Any] | None = None
    reattach_failures: int = 0
    started_at: float = 0.0  # time.monotonic() when ``started`` first arrived
    ended_at: float = 0.0  # and when the terminal frame did

    async def run(self, task_status: Any = None) -> None:
        """Follow the command; ``task_status.started()`` once it got ``started``."""
        import trio
        from trio_websocket import ConnectionClosed

        from tests.helpers import exec_socket

        offsets = {"stdout": 0, "stderr": 0}
        while self.terminal is None:
            try:
                async with exec_socket(self.ws_url) as client:
                    if self.command_id is None:
                        frame = {"command": self.command.command, "pty": self.command.pty}
                        await client.send(type="execute", **frame, **self.fields)
                    else:
                        await client.send(
                            type="reconnect",
                            command_id=self.command_id,
                            stdout_offset=offsets["stdout"],
                            stderr_offset=offsets["stderr"],
                        )
                    try:
                        while True:
                            frame = await client.recv()
                            client.transcript.frames.clear()
                            kind = frame["type"]
                            if kind == "started":
                                first = self.command_id is None
                                self.command_id, self.pid = frame["command_id"], frame["pid"]
                                self.reattach_failures = 0
                                if first:
                                    self.started_at = time.monotonic()
                                if first and task_status is not None:
                                    task_status.started()
                            elif kind in offsets:
                                assert frame["offset"] == offsets[kind], (kind, frame, offsets)
                                data = frame["data"].encode()
                                offsets[kind] += len(data)
                                self.streams[kind].update(data)
                            elif kind in ("exit", "error"):
                                self.ended_at = time.monotonic()
                                self.terminal = frame
                                return
                            else:
                                raise AssertionError(f"unexpected frame {frame}")
                    except ConnectionClosed as closed:
                        self.closes.append(closed.reason.code)
            except (OSError, trio.BrokenResourceError, BaseExceptionGroup) as error:
                # refused, reset, or a 503 before the 101: try again shortly
                if isinstance(error, BaseExceptionGroup):
                    _, rest = error.split(_CONNECTION_ERRORS)
                    if rest is not None:
                        raise
                self.reattach_failures += 1
                assert self.reattach_failures < 200, f"cannot reattach: {error!r}"
                await trio.sleep(0.05)

    @property
    def exit_code(self) -> int | None:
        if self.terminal is None or self.terminal["type"] != "exit":
            return None
        return int(self.terminal["exit_code"])
