"""Accepting connections and handing each to hypercorn's trio protocol stack.

hypercorn's own ``worker_serve`` runs every connection in one nursery, so an exception
escaping one connection's protocol handling (seen: h11 ``LocalProtocolError`` when a
client sends WebSocket data before the upgrade is answered) ends the whole server. Here
each connection runs ``hypercorn.trio.tcp_server.TCPServer`` inside its own guard: a
failure is logged and closes that connection only.
"""

from __future__ import annotations

import logging
import socket
from functools import partial

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

log = logging.getLogger("sandboxd.http")


async def serve_http(
    app: object,
    config: HypercornConfig,
    sock: socket.socket,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the listening ``sock`` until ``stop`` is set.

    Then stop accepting, let open connections finish for ``config.graceful_timeout``
    seconds, and cancel what is left.
    """
    context = WorkerContext(None)
    wrapped = ASGIWrapper(app)  # type: ignore[arg-type]
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await TCPServer(wrapped, config, context, ConnectionState({}), stream)  # type: ignore[arg-type]
        except Exception:
            log.exception("connection failed; closed it")
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                partial(trio.serve_listeners, handle, [listener], handler_nursery=connections)
            )
            task_status.started()
            await stop.wait()
            accepting.cancel_scope.cancel()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
