"""``GET /execute/ws``: one WebSocket bound to one command session (protocol.md §2).

A connection waits for its binding frame (``execute`` or ``reconnect``), holding any
control frame that comes before it is applied (§2.3.6) and applying those once bound. It
then streams ``started``, the output from its own cursors, and the session's terminal
frame, and closes with 1000. Meanwhile a receive task applies ``input``, ``close_stdin``,
``kill``, ``signal`` and ``resize`` as they arrive, so a client that stops reading can
still be heard, and a disconnect (clean or not) detaches at once.

Order: the receive task is the only one that applies frames once the held ones are done,
and the bytes of an ``input`` are queued before anything awaits, so stdin gets the bytes
of one socket in the order its frames arrived, and a ``close_stdin`` closes after them.
Back-pressure: applying an ``input`` waits only while the command's stdin queue is over
its cap (``STDIN_BUFFER_CAP``); that pause is the one place where the socket is not read,
so a ``kill``, ``signal`` or ``resize`` behind up to that much unwritten input acts at once.

Where the transport sees pongs (the lean path), a ping follows the output written when
none is outstanding, and each pong tells the session what the client acknowledged
(``core/session.py``, acknowledged delivery): pacing then bounds the bytes in flight.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from sandboxd.core.config import CHUNK_BYTES, FRAME_BYTES, MAX_FRAME_BYTES
from sandboxd.core.errors import InvalidRequest, SandboxdError
from sandboxd.core.messages import (
    CloseStdin,
    ControlMessage,
    Error,
    Execute,
    Gap,
    Input,
    Kill,
    Reconnect,
    Resize,
    ServerMessage,
    Signal,
    Started,
    Stderr,
    Stdout,
    decode_client,
    encode,
    read_only_refusal,
)
from sandboxd.core.ringbuffer import ReadResult
from sandboxd.core.session import Attachment, Stream, ping_due, receive_pong, start_ping
from sandboxd.endpoints.transport import MessageTransport
from sandboxd.runtime import process
from sandboxd.runtime.supervisor import STDIN_BUFFER_CAP, LiveSession, Supervisor

log = logging.getLogger("sandboxd.exec")

#: Control frames held before the binding frame; more is a misbehaving client.
MAX_PENDING_CONTROL = 256
#: Characters of control frames held before the binding frame; more is a misbehaving client.
MAX_PENDING_TEXT = STDIN_BUFFER_CAP
#: Output gathered into one write while more is ready (several frames, one syscall).
BATCH_BYTES = 4 * FRAME_BYTES
#: How long, after the close that follows the terminal frame, the client's is awaited.
CLOSE_WAIT = 2.0


class ExecConnection:
    """One accepted ``/execute/ws`` socket."""

    def __init__(self, supervisor: Supervisor, transport: MessageTransport, peer: str) -> None:
        self._supervisor = supervisor
        self._transport = transport
        self._peer = peer
        self._bound = trio.Event()
        self._bind_message: Execute | Reconnect | None = None
        self._pending: deque[tuple[ControlMessage, int]] = deque()
        self._pending_text = 0
        self._applying = trio.Event()  # set once the held frames are applied
        self._scope = trio.CancelScope()
        self.live: LiveSession | None = None
        self._attachment: Attachment | None = None
        self.started_sent = False
        self._closed = False
        self._broken = False  # a send failed: the connection is gone
        self._detached = False
        self._pings = transport.on_pong(self._on_pong)

    async def run(self) -> None:
        """Serve the socket until the command's end, an error, or the client leaves.

        After the terminal frame and the close, the receive task reads on until the
        client's close (for at most ``CLOSE_WAIT``), so that the transport has it and
        need not wait for it again."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_loop)
                    ended = False
                    if await self._bind():
                        assert self.live is not None and self._attachment is not None
                        ended = await self._stream(self.live, self._attachment)
                    self._detach()
                    if ended:
                        nursery.cancel_scope.deadline = trio.current_time() + CLOSE_WAIT
                    else:
                        nursery.cancel_scope.cancel()
        finally:
            self._detach()  # also when the client vanished between attaching and the first frame

    def _detach(self) -> None:
        if self._attachment is not None and self.live is not None and not self._detached:
            self._detached = True
            self._supervisor.detach(self.live, self._attachment)

    async def going_away(self) -> None:
        """The daemon is stopping: 1001 once ``started`` went out (the SDKs then
        reattach), a plain 1000 before it (they re-send the same ``execute``)."""
        await self._close(1001 if self.started_sent else 1000)
        self._scope.cancel()

    # ---- receiving --------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            text = await self._transport.receive()
            if text is None:  # the client closed, broke the protocol, or dropped
                self._closed = True
                self._scope.cancel()
                return
            try:
                if isinstance(text, bytes):
                    raise InvalidRequest("binary frames are not accepted; send JSON text frames")
                message = decode_client(text)
                if isinstance(message, Execute | Reconnect):
                    if self._bind_message is not None:
                        raise InvalidRequest("this socket is already bound to a command")
                    self._bind_message = message
                    self._bound.set()
                    continue
                if not self._applying.is_set() and self._holding_full():
                    if self._bind_message is None:
                        raise InvalidRequest(
                            f"more than {MAX_PENDING_CONTROL} control frames or "
                            f"{MAX_PENDING_TEXT} characters before execute/reconnect"
                        )
                    await self._applying.wait()  # pipelined behind the binding frame
                if self._applying.is_set():
                    assert self.live is not None
                    await self._apply(self.live, message)
                else:
                    self._pending.append((message, len(text)))
                    self._pending_text += len(text)
            except SandboxdError as exc:
                await self._fail(exc)
                return

    def _holding_full(self) -> bool:
        return len(self._pending) >= MAX_PENDING_CONTROL or self._pending_text >= MAX_PENDING_TEXT

    async def _apply_held(self, live: LiveSession) -> None:
        """Apply the held frames in order, frames the receive task holds meanwhile
        included; from the moment none is left, the receive task applies its own."""
        try:
            while self._pending:
                message, size = self._pending.popleft()
                self._pending_text -= size
                await self._apply(live, message)
        except SandboxdError as exc:
            await self._fail(exc)
            return
        self._applying.set()

    async def _apply(self, live: LiveSession, message: ControlMessage) -> None:
        """Carry out one control frame; only an ``input`` over the stdin cap waits."""
        if self._attachment is not None and self._attachment.watch:
            refusal = read_only_refusal(message)
            if refusal is not None:
                await self._send(refusal)  # not terminal: the watcher reads on
                return
        match message:
            case Input(data=data):
                await live.queue_input(data.encode())
            case CloseStdin():
                live.close_input()
            case Kill():
                self._supervisor.kill(live)
            case Signal(signal=value):
                signo = process.parse_signal(value)
                if live.status is None:
                    process.signal_group(live.child.pid, signo)
            case Resize(cols=cols, rows=rows):
                live.resize(cols, rows)

    # ---- binding and streaming --------------------------------------------------------

    async def _bind(self) -> bool:
        """Attach to the command the binding frame names; False when refused."""
        await self._bound.wait()
        message = self._bind_message
        assert message is not None
        supervisor = self._supervisor
        try:
            if isinstance(message, Execute):
                live, created = await supervisor.get_or_create(message)
                offsets = (0, 0)
            else:
                live = supervisor.lookup(message.command_id)
                created = False
                offsets = (message.stdout_offset, message.stderr_offset)
            watch = isinstance(message, Reconnect) and message.watch
        except SandboxdError as exc:
            log.info(
                "request refused",
                extra={"error_type": exc.error_type, "error": exc.message, "peer": self._peer},
            )
            await self._fail(exc)
            return False
        self.live = live
        self._attachment = supervisor.attach(live, *offsets, watch=watch)
        log.debug(
            "client attached",
            extra={
                "command_id": live.command_id,
                "peer": self._peer,
                "via": "execute" if created else type(message).__name__.lower(),
                "watch": watch,
                "stdout_offset": offsets[0],
                "stderr_offset": offsets[1],
            },
        )
        await self._send(Started(command_id=live.command_id, pid=live.child.pid))
        self.started_sent = True
        await self._apply_held(live)
        return True

    async def _stream(self, live: LiveSession, attachment: Attachment) -> bool:
        """Send the output from the attachment's cursors until the terminal frame (True,
        once it and the close went out) or until the client is gone (False)."""
        core = live.core
        while True:
            batch: list[ServerMessage | bytes] = []
            size = 0
            progressed = True
            while progressed and size < BATCH_BYTES:
                progressed = False
                for stream in (Stream.STDOUT, Stream.STDERR):
                    result = core.read(attachment, stream, FRAME_BYTES)
                    if result.gap is not None:
                        start, end = result.gap
                        batch.append(Gap(stream=stream.value, from_=start, to=end))
                        progressed = True
                    if result.data:
                        payload = _output_frame(stream, result)
                        if len(payload) > MAX_FRAME_BYTES:  # escaping grew it: at most 6x
                            result = core.read(attachment, stream, CHUNK_BYTES)
                            payload = _output_frame(stream, result)
                        batch.append(payload)
                        size += len(result.data)
                        progressed = True
                    if result.gap is not None or result.data:
                        live.delivered(attachment, stream, result)
            if core.finished_for(attachment):
                # The last output, the terminal frame and the close: one write.
                batch.append(core.terminal_message())
                await self._send(*batch, close=1000)
                return not self._broken
            if batch:
                await self._send(*batch)
                continue
            if self._closed:
                return False  # the client is gone (the scope's cancel lands at a checkpoint)
            if self._pings and ping_due(attachment):
                await self._send()  # a ping behind what was written before the last pong
                continue  # (output that came meanwhile is read before parking)
            await live.wait_for_output(attachment)

    def _on_pong(self, payload: bytes) -> None:
        """The client's pong: what it acknowledged may let the command run on; a parked
        stream with output written since that ping is woken to send the next ping."""
        live, attachment = self.live, self._attachment
        if live is None or attachment is None or self._detached:
            return
        if receive_pong(attachment, payload, trio.current_time()):
            live.notify_consumed()
            if attachment.waiting and ping_due(attachment):
                live.notify_changed()

    # ---- sending ----------------------------------------------------------------------

    async def _send(self, *messages: ServerMessage | bytes, close: int | None = None) -> None:
        """``messages`` (or their encoded payloads) in one write, then a close with
        ``close`` if given, else a ping if one is due; nothing is sent once a close went
        out."""
        if self._closed:
            return
        if close is not None:
            self._closed = True
        ping = None
        attachment = self._attachment
        if self._pings and close is None and attachment is not None and ping_due(attachment):
            ping = start_ping(attachment, trio.current_time())
        try:
            payloads = [m if isinstance(m, bytes) else encode(m) for m in messages]
            await self._transport.send(payloads, close=close, ping=ping)
        except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
            # When the client closes at the same moment, hypercorn's own close handling
            # can collide with a write (BusyResourceError): the connection is ending
            # either way, so that is the end.
            self._closed = self._broken = True
            self._scope.cancel()

    async def _close(self, code: int) -> None:
        await self._send(close=code)

    async def _fail(self, exc: SandboxdError) -> None:
        """Answer with an ``error`` frame and close; the command itself is untouched."""
        await self._send(Error(error_type=exc.error_type, error=exc.message), close=1000)
        self._scope.cancel()


def _output_frame(stream: Stream, result: ReadResult) -> bytes:
    """The encoded ``stdout``/``stderr`` frame carrying ``result``'s data."""
    text = result.data.decode()
    if stream is Stream.STDOUT:
        return encode(Stdout(data=text, offset=result.offset))
    return encode(Stderr(data=text, offset=result.offset))
