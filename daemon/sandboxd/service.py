"""Running the whole daemon inside a trio task: reaper, supervisor, HTTP server.

``cli.py`` calls ``serve`` with a socket it made; tests call it the same way to get a
real server on a real port inside their own nursery.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig

from sandboxd.core.config import Config
from sandboxd.core.handover import HandoverState
from sandboxd.core.session import SessionState
from sandboxd.http import wsoptions
from sandboxd.http.app import App
from sandboxd.http.listener import AcceptControl, LeanOptions, serve_http
from sandboxd.runtime import carried, memory, process, spawn, spawner
from sandboxd.runtime.live import LiveSession
from sandboxd.runtime.notify import Notifier
from sandboxd.runtime.resume import Resumed
from sandboxd.runtime.supervisor import Supervisor
from sandboxd.runtime.upgrade import (
    UpgradeContext,
    Upgrader,
    UpgradeStatus,
    log_upgrade,
    step_ms,
)

log = logging.getLogger("sandboxd")


def make_listen_socket(config: Config) -> socket.socket:
    """The listening socket, made here so that it is close-on-exec.

    (hypercorn's own socket creation marks it inheritable, and every command would then
    hold the daemon's port.)
    """
    host, port = config.listen_host_port()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


@dataclass
class Running:
    """A daemon started by ``serve``: where it listens, and how to stop it."""

    address: str
    app: App
    supervisor: Supervisor
    stop: trio.Event
    done: trio.Event
    upgrader: Upgrader | None = None


class _Frontend:
    """The HTTP side as a live upgrade drives it."""

    def __init__(self, app: App, control: AcceptControl) -> None:
        self._app = app
        self._control = control

    def pause_accepting(self) -> None:
        self._control.pause()

    def resume_accepting(self) -> None:
        self._app.sse.resume_serving()
        self._control.resume()

    async def wait_drained(self, seconds: float) -> bool:
        deadline = trio.current_time() + seconds
        # Connections accepted before the pause get a moment to send their request
        # head (then it is served, and the connection closed after the answer); a
        # silent one does not hold the upgrade up.
        with trio.move_on_after(min(seconds, 1.0)):
            await self._control.wait_heads_read()
        return await self._app.wait_drained(max(0.0, deadline - trio.current_time()))

    async def close_for_upgrade(self, within: float) -> None:
        with trio.move_on_after(within):
            await self._app.close_for_upgrade()
            # No connection may be cut mid-answer by the exec: every accepted one is
            # waited for (a 503 to a late request head, a 1001 close handshake).
            await self._control.wait_connections_ended()
        if self._control.connections:
            log.info(
                "upgrade: connections left to the exec",
                extra={"connections": self._control.connections},
            )

    async def reopen(self) -> None:
        self._app.reopen_after_upgrade()


async def _log_timing(state: HandoverState, marks: dict[str, int], supervisor: Supervisor) -> None:
    """The ``upgrade timing`` line: each start-up step of the new image since the old
    image's snapshot, and the first byte a carried stream read (waited for up to 2 s)."""
    found = (supervisor.sessions.get(record.core.command_id) for record in state.sessions)
    adopted = [live for live in found if live is not None and live.open_fds]
    with trio.move_on_after(2.0) as scope:

        async def first(live: LiveSession) -> None:
            while not live.first_read_ns:
                await live.wait_changed()
            scope.cancel()

        async with trio.open_nursery() as waiting:
            for live in adopted:
                waiting.start_soon(first, live)
    reads = [live.first_read_ns for live in adopted if live.first_read_ns]
    first_read = {"first_read": min(reads)} if reads else {}
    fields = step_ms("snapshot", state.snapshot_monotonic_ns, {**marks, **first_read})
    fields |= step_ms("trigger", state.trigger_monotonic_ns, {"accepting": marks["accepting"]})
    log.info("upgrade timing", extra={**fields, "sessions": len(state.sessions)})


def _hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    hc.accesslog = None
    hc.errorlog = logging.getLogger("sandboxd.http")
    hc.websocket_max_message_size = config.ws_max_message_bytes  # beyond it: close 1009
    # hypercorn arms this timer when a connection opens and only re-arms it once a request
    # is done, so it bounds the time to send a whole request head (slow or idle handshakes).
    hc.keep_alive_timeout = config.handshake_timeout_seconds
    hc.graceful_timeout = 2.0
    return hc


async def serve(
    config: Config,
    sock: socket.socket,
    *,
    notifier: Notifier | None = None,
    upgrade: UpgradeContext | None = None,
    resumed: Resumed | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``Running.stop`` is set, then stop gracefully.

    A graceful stop refuses new upgrades (503), SIGTERMs every command, SIGKILLs what is
    left after ``config.stop_grace``, lets attached clients receive their commands'
    last output and exit, and closes what is still open with 1001.

    ``upgrade`` enables live upgrades (the daemon's own process, started by
    ``server_cli``); ``resumed`` is the state the previous image handed over: its
    sessions are adopted, and their pids registered, before the reaper's first pass.
    """
    wsoptions.set_compression(config.ws_compression)
    wsoptions.harden_message_buffer()
    spawn.close_inherited_fds_on_exec()
    spawn.relay_program()  # the PTY relays' program: held open from here on (one fd)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reaper = process.Reaper()
    helper: spawner.SpawnHelper | None = None
    status = UpgradeStatus()
    if resumed is not None:
        status.generation, status.last = resumed.generation, resumed.last
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as sessions_nursery:
            supervisor = Supervisor(config, reaper, sessions_nursery)
            state = resumed.state if resumed is not None else None
            if state is not None:
                swap = (time.monotonic_ns() - state.snapshot_monotonic_ns) / 1e9
                now = trio.current_time() - max(0.0, swap)  # the swap counts as time passed
                for live in carried.rebuild(supervisor, state.sessions, now):
                    if live.core.grace_until is not None:
                        # The grace counts from now, when the clients can come back: a
                        # slow swap must not eat it.
                        live.core.grace_until = trio.current_time() + config.upgrade_grace
                    if live.core.state is SessionState.EXPIRED:
                        supervisor.adopt_expired(live, config.upgrade_grace)
                    else:
                        supervisor.adopt(live)
                supervisor.restore_counts(
                    state.expired_keys, state.commands_started, state.orphans_reaped
                )
            # The spawner helper: a previous image's (a live upgrade) is not an orphan.
            spawner.collect_old_helpers(reaper)
            supervisor.spawn_helper = helper = spawner.SpawnHelper.start(reaper)
            if helper is not None:
                nursery.start_soon(helper.run)
            await nursery.start(reaper.run)  # the first reap pass: every pid has its owner
            app = App(supervisor, config, port)
            control = AcceptControl()
            upgrader = Upgrader(
                config,
                supervisor,
                _Frontend(app, control),
                sock.fileno(),
                status,
                upgrade,
                notifier,
            )
            app.upgrade_status, app.upgrader, app.background = status, upgrader, nursery
            stop = trio.Event()
            server_stopped = trio.Event()
            server_done = trio.Event()

            async def run_server(task_status: trio.TaskStatus[None]) -> None:
                try:
                    await serve_http(
                        app,
                        _hypercorn_config(config),
                        sock,
                        server_stopped,
                        max_connections=config.max_connections,
                        lean=LeanOptions(app, config.ws_max_message_bytes, config.ws_compression),
                        control=control,
                        task_status=task_status,
                    )
                finally:
                    server_done.set()

            await nursery.start(run_server)
            nursery.start_soon(memory.keep_trimmed, lambda: supervisor.commands_started)
            if state is not None and status.last is not None:
                swap_ms = (time.monotonic_ns() - state.snapshot_monotonic_ns) / 1e6
                status.last.swap_ms = round(swap_ms, 3)
                log_upgrade(status)
                assert resumed is not None
                resumed.marks["accepting"] = time.monotonic_ns()
                nursery.start_soon(_log_timing, state, resumed.marks, supervisor)
            elif status.last is not None:
                log_upgrade(status)
            # Which spawner runs: the helper (runtime/spawner.py) or the loop's own spawns.
            spawns = spawner.PROGRAM_NAME if helper is not None else "event loop"
            log.info("listening", extra={"address": address, "spawner": spawns})
            if notifier is not None:
                notifier.send("READY=1", f"STATUS=listening on {address}")
                nursery.start_soon(notifier.keep_watchdog)
            running = Running(address, app, supervisor, stop, trio.Event(), upgrader)
            task_status.started(running)
            await stop.wait()
            log.info("stopping", extra={"sessions": len(supervisor.sessions)})
            if notifier is not None:
                notifier.send("STOPPING=1", "STATUS=stopping: ending commands")
            await supervisor.stop_all(config.stop_grace)
            with trio.move_on_after(1.0):  # clients still reading their commands' ends
                await app.wait_no_connections()
            await app.going_away()
            server_stopped.set()
            with trio.move_on_after(3.0):
                await server_done.wait()
            sessions_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    if helper is not None:
        helper.stop()
    log.info("stopped")
    running.done.set()
