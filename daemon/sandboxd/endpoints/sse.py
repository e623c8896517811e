"""Command execution over plain HTTP: SSE (protocol.md §3) and the blocking
``POST /execute`` of the TypeScript fallback (§4).

Both use the same sessions as ``/execute/ws``: a command started over SSE can be watched
over a WebSocket and the other way round. An SSE response is one attachment with its own
cursors. It delivers at most ``sse_ack_bytes`` of output and then ends with
``ack_required`` (the client resumes at once from the offsets it names), which bounds
what a proxy in between must buffer.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
import trio

from sandboxd.core.config import CHUNK_BYTES
from sandboxd.core.errors import CommandTimeout, PayloadTooLarge
from sandboxd.core.messages import Error, Execute, RunConfig
from sandboxd.core.session import Attachment, Stream
from sandboxd.http.asgi import Receive, Scope, Send, read_json, respond_json
from sandboxd.runtime.supervisor import LiveSession, Supervisor

log = logging.getLogger("sandboxd.sse")

HEARTBEAT_SECONDS = 15.0
#: Output collected per stream by the blocking ``POST /execute``; more is refused.
EXECUTE_OUTPUT_LIMIT = 64 * 1024 * 1024

_encoder = msgspec.json.Encoder()


class StreamStart(msgspec.Struct, forbid_unknown_fields=False):
    """Body of ``POST /execute/stream/start`` (stdin is closed at spawn, no PTY)."""

    command: str
    command_id: str | None = None
    shell: str = "/bin/bash"
    timeout_seconds: int = 60
    idle_timeout_seconds: int = 300
    ttl_seconds: int = 600
    env: dict[str, str] | None = None
    cwd: str | None = None
    run_config: RunConfig | None = None


class StreamResume(msgspec.Struct, forbid_unknown_fields=False):
    """Body of ``POST /execute/stream/resume``."""

    command_id: str
    stdout_offset: int = 0
    stderr_offset: int = 0


class BlockingExecute(msgspec.Struct, forbid_unknown_fields=False):
    """Body of ``POST /execute`` (note ``timeout``, not ``timeout_seconds``)."""

    command: str
    timeout: int = 60
    shell: str = "/bin/bash"
    env: dict[str, str] | None = None
    cwd: str | None = None
    run_config: RunConfig | None = None


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), _encoder.encode(payload))


async def _collect(
    live: LiveSession, attachment: Attachment, collected: dict[Stream, list[bytes]]
) -> Stream | None:
    """Read both streams into ``collected`` until the command's end; the stream that
    passed ``EXECUTE_OUTPUT_LIMIT`` first, if one did (reading stops there)."""
    core = live.core
    sizes = dict.fromkeys(collected, 0)
    while True:
        for stream in collected:
            result = core.read(attachment, stream, CHUNK_BYTES)
            if result.data:
                collected[stream].append(result.data)
                sizes[stream] += len(result.data)
                if sizes[stream] > EXECUTE_OUTPUT_LIMIT:
                    return stream
            if result.data or result.gap:
                live.delivered(attachment, stream, result)
        if core.finished_for(attachment):
            return None
        if core.caught_up(attachment):
            await live.wait_for_output(attachment)


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client goes away."""
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            scope.cancel()
            return


class SseEndpoints:
    """The HTTP execution endpoints, bound to one supervisor."""

    def __init__(self, supervisor: Supervisor, ack_bytes: int) -> None:
        self._supervisor = supervisor
        self._ack_bytes = ack_bytes
        self._ending = False  # a live upgrade: every stream ends with ack_required
        self._streaming: list[LiveSession] = []
        self._none_streaming = trio.Event()
        self._none_streaming.set()

    async def end_for_upgrade(self) -> None:
        """End every response with ``ack_required`` at its client's offsets (the Python
        client resumes at once, and the next image serves the resume)."""
        self._ending = True
        for live in list(self._streaming):
            live.notify_changed()
        await self._none_streaming.wait()

    def resume_serving(self) -> None:
        """The upgrade was refused: stream as before."""
        self._ending = False

    async def start(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /execute/stream/start``: get-or-create, then stream from offset 0."""
        body = await read_json(scope, receive, StreamStart)
        request = Execute(
            command=body.command,
            command_id=body.command_id,
            shell=body.shell,
            timeout_seconds=body.timeout_seconds,
            idle_timeout_seconds=body.idle_timeout_seconds,
            ttl_seconds=body.ttl_seconds,
            env=body.env,
            cwd=body.cwd,
            run_config=body.run_config,
            close_stdin=True,
        )
        live, _ = await self._supervisor.get_or_create(request, via="sse")
        await self._respond(receive, send, live, self._supervisor.attach(live, 0, 0))

    async def resume(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /execute/stream/resume``: continue from the client's offsets, as the
        same reader when its previous response ended with ``ack_required``."""
        body = await read_json(scope, receive, StreamResume)
        offsets = (body.stdout_offset, body.stderr_offset)
        taken = self._supervisor.handoffs.take_over(body.command_id, *offsets)
        if taken is None:
            live = self._supervisor.lookup(body.command_id)
            taken = live, self._supervisor.attach(live, *offsets)
        await self._respond(receive, send, *taken)

    async def _respond(
        self, receive: Receive, send: Send, live: LiveSession, attachment: Attachment
    ) -> None:
        acked = False
        self._streaming.append(live)
        self._none_streaming = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_disconnect, receive, scope)
                    acked = await self._stream(send, live, attachment)
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    nursery.cancel_scope.cancel()
        finally:
            self._streaming.remove(live)
            if not self._streaming:
                self._none_streaming.set()
            if acked:  # the client resumes at once
                self._supervisor.handoffs.hand_over(live, attachment)
            else:
                self._supervisor.detach(live, attachment)

    async def _stream(self, send: Send, live: LiveSession, attachment: Attachment) -> bool:
        """Stream one response but its end; True when it ended with ``ack_required``
        (the client, having read that, resumes even if the end is lost)."""
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        core = live.core
        await emit(
            _event("started", {"command_id": live.command_id, "pid": core.pid, "stdin_received": 0})
        )
        delivered = 0
        while True:
            progressed = False
            for stream in (Stream.STDOUT, Stream.STDERR):
                result = core.read(attachment, stream, CHUNK_BYTES)
                if result.data:
                    # msgspec writes bytes as base64, the encoding the client expects.
                    payload = {"offset": result.offset, "data": result.data}
                    await emit(_event(stream.value, payload))
                    delivered += len(result.data)
                    progressed = True
                if result.data or result.gap:
                    live.delivered(attachment, stream, result)
            finished = core.finished_for(attachment)
            if (delivered >= self._ack_bytes or self._ending) and not finished:
                offsets = {
                    "stdout_offset": attachment.stdout_cursor,
                    "stderr_offset": attachment.stderr_cursor,
                }
                await emit(_event("ack_required", offsets))
                return True
            if progressed:
                continue
            if finished:
                for stream in (Stream.STDOUT, Stream.STDERR):
                    end = core.ring(stream).end
                    await emit(_event("stream_end", {"stream": stream.value, "offset": end}))
                terminal = core.terminal_message()
                if isinstance(terminal, Error):
                    await emit(
                        _event(
                            "error", {"error_type": terminal.error_type, "error": terminal.error}
                        )
                    )
                else:
                    await emit(_event("exit", {"exit_code": terminal.exit_code}))
                break
            if not await live.wait_for_output(attachment, HEARTBEAT_SECONDS):
                await emit(b": ping\n\n")
        return False

    async def execute(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /execute``: run to the end and answer ``{stdout, stderr, exit_code}``."""
        body = await read_json(scope, receive, BlockingExecute)
        request = Execute(
            command=body.command,
            command_id=uuid.uuid4().hex,
            shell=body.shell,
            timeout_seconds=body.timeout,
            idle_timeout_seconds=-1,
            ttl_seconds=0,
            kill_on_disconnect=True,
            env=body.env,
            cwd=body.cwd,
            run_config=body.run_config,
            close_stdin=True,
        )
        live, _ = await self._supervisor.get_or_create(request, via="http")
        attachment = self._supervisor.attach(live, 0, 0)
        collected: dict[Stream, list[bytes]] = {Stream.STDOUT: [], Stream.STDERR: []}
        try:
            with trio.CancelScope() as watch:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_disconnect, receive, watch)
                    # (raised in here, an error would leave the nursery as an
                    # ExceptionGroup, which no HTTP error handler answers)
                    overflowed = await _collect(live, attachment, collected)
                    nursery.cancel_scope.cancel()
        finally:
            self._supervisor.detach(live, attachment)
        if watch.cancelled_caught:
            return  # the client left; kill_on_disconnect ended the command
        if overflowed is not None:
            self._supervisor.kill(live)
            raise PayloadTooLarge(
                f"{overflowed.value} passed {EXECUTE_OUTPUT_LIMIT} bytes; "
                "stream large output over /execute/ws instead"
            )
        terminal = live.core.terminal_message()
        if isinstance(terminal, Error):
            raise CommandTimeout(terminal.error)
        await respond_json(
            send,
            200,
            {
                "stdout": b"".join(collected[Stream.STDOUT]).decode(),
                "stderr": b"".join(collected[Stream.STDERR]).decode(),
                "exit_code": terminal.exit_code,
            },
        )
