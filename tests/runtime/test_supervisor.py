"""The supervisor's timers on virtual time, with fake children (no real process).

A fake child is a pair of pipes whose write ends the test holds; its "kill" closes them
and reports a death by SIGKILL. With ``autojump_clock`` every deadline is checked to the
exact virtual second.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import trio

from sandboxd.core.config import Config
from sandboxd.core.errors import CommandNotFound, ServerShuttingDown, SessionExpired
from sandboxd.core.messages import Execute, Exit
from sandboxd.core.session import Attachment, ExitStatus, SessionState, Stream
from sandboxd.runtime import carried, process, spawn
from sandboxd.runtime.supervisor import STDIN_BUFFER_CAP, LiveSession, Supervisor


class FakeReaper(process.Reaper):
    def watch(
        self,
        child: spawn.Child,
        on_exit: Callable[[ExitStatus], None],
        since: int | None = None,
    ) -> None:
        self._owners[child.pid] = on_exit


@dataclass
class FakeChildren:
    reaper: FakeReaper
    writers: dict[int, list[int]] = field(default_factory=dict)
    kills: list[tuple[int, float]] = field(default_factory=list)
    next_pid: int = 10_000_000  # beyond pid_max: never a real process
    #: the read end of each child's stdin, when spawned with ``close_stdin=False``
    stdin: dict[int, int] = field(default_factory=dict)
    #: every signal sent, (pid, signal, when); a fake dies of any but those it ignores
    signals: list[tuple[int, int, float]] = field(default_factory=list)
    ignores: set[tuple[int, int]] = field(default_factory=set)  # (pid, signal)

    def spawn(self, request: spawn.SpawnRequest) -> spawn.Child:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.next_pid += 1
        self.writers[self.next_pid] = [out_w, err_w]
        in_w = None
        if not request.close_stdin:
            self.stdin[self.next_pid], in_w = os.pipe()
        return spawn.Child(self.next_pid, out_r, err_r, in_w, False)

    def write(self, pid: int, data: bytes) -> None:
        os.write(self.writers[pid][0], data)

    def exit(self, pid: int, status: ExitStatus) -> None:
        for fd in self.writers.pop(pid, []):
            os.close(fd)
        self.reaper._owners.pop(pid)(status)

    def kill_tree(self, pid: int, signo: int, command_id: str | None = None) -> None:
        self.signals.append((pid, signo, trio.current_time()))
        if (pid, signo) in self.ignores:
            return
        self.kills.append((pid, trio.current_time()))
        if pid in self.writers:
            self.exit(pid, ExitStatus(128 + signo, signo))


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[Supervisor, FakeChildren]]:
    children = FakeChildren(FakeReaper())
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(
            Config(drain_seconds=0.5),
            children.reaper,
            nursery,
            spawn=children.spawn,
            kill_tree=children.kill_tree,
        )
        yield supervisor, children
        nursery.cancel_scope.cancel()


def execute(**fields: object) -> Execute:
    settings: dict[str, object] = {"command": "fake", "command_id": "c1"}
    settings.update(fields)
    return Execute(**settings)  # type: ignore[arg-type]


async def test_timeout_kills_at_exactly_the_deadline(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    start = trio.current_time()
    live, created = await supervisor.get_or_create(execute(timeout_seconds=60))
    assert created
    attachment = supervisor.attach(live, 0, 0)
    await live.reaped.wait()
    assert children.kills == [(live.child.pid, start + 60)]
    while live.core.state is SessionState.RUNNING:
        await live.wait_changed()
    assert live.core.terminal_message().error_type == "CommandTimeout"  # type: ignore[union-attr]
    supervisor.detach(live, attachment)


async def test_idle_timeout_counts_from_the_last_detach(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, _ = await supervisor.get_or_create(execute(timeout_seconds=0, idle_timeout_seconds=300))
    attachment = supervisor.attach(live, 0, 0)
    await trio.sleep(1000)
    assert children.kills == []  # attached: never idle
    left_at = trio.current_time()
    supervisor.detach(live, attachment)
    await live.reaped.wait()
    assert children.kills == [(live.child.pid, left_at + 300)]


async def test_kill_on_disconnect_kills_at_the_moment_the_last_client_leaves(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, _ = await supervisor.get_or_create(execute(kill_on_disconnect=True))
    first, second = supervisor.attach(live, 0, 0), supervisor.attach(live, 0, 0)
    await trio.sleep(5)
    supervisor.detach(live, first)
    assert children.kills == []
    await trio.sleep(5)
    supervisor.detach(live, second)
    assert children.kills == [(live.child.pid, trio.current_time())]


async def test_ttl_removes_a_finished_session_at_exactly_its_end(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, _ = await supervisor.get_or_create(execute(ttl_seconds=600, timeout_seconds=0))
    children.write(live.child.pid, b"bye\n")
    await trio.sleep(1)
    children.exit(live.child.pid, ExitStatus(0))
    while live.core.state is SessionState.RUNNING:
        await live.wait_changed()
    ended = trio.current_time()
    assert live.core.stdout.read_from(0, 100).data == b"bye\n"
    await trio.sleep(600 - 0.001)
    assert supervisor.lookup("c1") is live
    await live.expired.wait()
    assert trio.current_time() == ended + 600
    await trio.sleep(0.001)
    with pytest.raises(SessionExpired):
        supervisor.lookup("c1")
    with pytest.raises(CommandNotFound):
        supervisor.lookup("never-was")


async def test_output_held_by_a_left_behind_child_is_drained_for_a_bounded_time(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, _ = await supervisor.get_or_create(execute(timeout_seconds=0))
    pid = live.child.pid
    writers = children.writers[pid]
    # The leader exits, but a "grandchild" still holds stdout open.
    children.reaper._owners.pop(pid)(ExitStatus(0))
    reaped_at = trio.current_time()
    while live.core.state is SessionState.RUNNING:
        await live.wait_changed()
    assert trio.current_time() == reaped_at + 0.5
    for fd in writers:
        os.close(fd)
    del children.writers[pid]


async def test_get_or_create_with_a_known_id_never_spawns_again(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    first, created = await supervisor.get_or_create(execute())
    again, created_again = await supervisor.get_or_create(execute(command="other"))
    assert created and not created_again and first is again
    assert len(children.writers) == 1
    children.kill_tree(first.child.pid, signal.SIGKILL)


async def test_an_execute_during_an_upgrade_waits_on_a_websocket_and_is_refused_over_http(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    """On a WebSocket it starts once the upgrade is over (refused: it starts here; a
    committed one closes the socket first); over HTTP it is a 503 at once."""
    supervisor, children = fakes
    supervisor.upgrading = True
    with pytest.raises(ServerShuttingDown, match="upgrading"):
        await supervisor.get_or_create(execute(command_id="h"), via="http")
    started: list[tuple[float, bool]] = []

    async def start() -> None:
        live, created = await supervisor.get_or_create(execute(command_id="w"))
        started.append((trio.current_time(), created))
        children.kill_tree(live.child.pid, signal.SIGKILL)

    begin = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(start)
        await trio.sleep(7)
        assert started == [] and children.writers == {}
        supervisor.upgrading = False  # refused
    assert started == [(begin + 7, True)]


async def test_a_watcher_does_not_hold_off_or_restart_the_idle_kill(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, _ = await supervisor.get_or_create(execute(timeout_seconds=0, idle_timeout_seconds=300))
    created_at = trio.current_time()
    await trio.sleep(200)
    watcher = supervisor.attach(live, 0, 0, watch=True)
    await trio.sleep(50)
    supervisor.detach(live, watcher)
    await live.reaped.wait()
    assert children.kills == [(live.child.pid, created_at + 300)]
    assert supervisor.snapshot()[0]["watchers"] == 0


async def test_sessions_report_watchers_apart_from_clients(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, _ = await supervisor.get_or_create(execute(timeout_seconds=0))
    client = supervisor.attach(live, 0, 0)
    watchers = [supervisor.attach(live, 0, 0, watch=True) for _ in range(2)]
    [row] = supervisor.snapshot()
    assert (row["clients"], row["watchers"]) == (1, 2)
    for attachment in [client, *watchers]:
        supervisor.detach(live, attachment)
    children.kill_tree(live.child.pid, signal.SIGKILL)


async def test_a_stop_sends_term_then_kill_after_the_grace_and_reports_reason_shutdown(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    # No timer but the stop's: the clock autojumps while a spawn waits for its worker
    # thread, which would otherwise let the idle timeout (300 s) kill a command first.
    never = {"timeout_seconds": 0, "idle_timeout_seconds": 0}
    stubborn, _ = await supervisor.get_or_create(execute(command_id="stubborn", **never))
    polite, _ = await supervisor.get_or_create(execute(command_id="polite", **never))
    children.ignores.add((stubborn.child.pid, signal.SIGTERM))
    start = trio.current_time()
    await supervisor.stop_all(grace=10)
    sent = sorted((pid, at - start, signo) for pid, signo, at in children.signals)
    assert sent == [
        (stubborn.child.pid, 0, signal.SIGTERM),
        (stubborn.child.pid, 10, signal.SIGKILL),  # --stop-grace after the TERM
        (polite.child.pid, 0, signal.SIGTERM),
    ]
    for live, signo in ((stubborn, signal.SIGKILL), (polite, signal.SIGTERM)):
        assert live.status == ExitStatus(128 + signo, signo)
        terminal = live.core.terminal_message()
        assert isinstance(terminal, Exit) and terminal.reason == "shutdown"


async def test_past_8_mib_of_queued_stdin_the_sender_waits_and_then_loses_nothing(
    fakes: tuple[Supervisor, FakeChildren],
) -> None:
    # docs/security.md, limits: "queued stdin per command: 8 MiB; past it the sender waits".
    # The fake child does not read its stdin until the sender has been made to wait.
    assert STDIN_BUFFER_CAP == 8 * 1024 * 1024  # the documented number
    supervisor, children = fakes
    live, _ = await supervisor.get_or_create(execute(close_stdin=False, timeout_seconds=0))
    piece = b"i" * 65536
    pieces = 3 * STDIN_BUFFER_CAP // len(piece)
    accepted = 0
    received = 0

    async def send_everything() -> None:
        nonlocal accepted
        for _ in range(pieces):
            await live.queue_input(piece)
            accepted += len(piece)
        live.close_input()  # EOF once everything queued is written

    async def read_everything() -> None:
        nonlocal received
        stream = trio.lowlevel.FdStream(children.stdin[live.child.pid])
        while data := await stream.receive_some(65536):
            assert data == b"i" * len(data)
            received += len(data)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_everything)
            seen = -1
            while accepted != seen:  # until the sender makes no progress for 0.5 s
                seen = accepted
                await trio.sleep(0.5)
            # Held by the daemon: the queue, one write in flight, and the stdin pipe (64 KiB).
            assert STDIN_BUFFER_CAP <= accepted <= STDIN_BUFFER_CAP + 65536 + 2 * len(piece)
            nursery.start_soon(read_everything)  # the child reads: the sender goes on
    assert accepted == received == pieces * len(piece)
    children.kill_tree(live.child.pid, signal.SIGKILL)


async def finish_with_output(
    supervisor: Supervisor,
    children: FakeChildren,
    output: bytes,
    clients: int,
    *,
    watchers: int = 0,
    **fields: object,
) -> tuple[LiveSession, list[Attachment]]:
    """A session with ``clients`` then ``watchers`` attached that wrote ``output`` to
    stdout and exited 0."""
    live, _ = await supervisor.get_or_create(execute(timeout_seconds=0, **fields))
    attachments = [supervisor.attach(live, 0, 0) for _ in range(clients)]
    attachments += [supervisor.attach(live, 0, 0, watch=True) for _ in range(watchers)]
    for start in range(0, len(output), 32768):  # below a pipe's buffer: never blocks
        children.write(live.child.pid, output[start : start + 32768])
        while live.core.stdout.end < start + len(output[start : start + 32768]):
            await live.wait_changed()
    children.exit(live.child.pid, ExitStatus(0))
    while live.core.state is SessionState.RUNNING:
        await live.wait_changed()
    return live, attachments


async def test_ttl_0_drops_the_session_at_the_finish_but_attached_clients_read_it_all(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    output = bytes(range(33, 127)) * 10_000
    live, (first, second) = await finish_with_output(supervisor, children, output, 2, ttl_seconds=0)
    await trio.sleep(60)  # however long the attached clients take
    with pytest.raises(SessionExpired):
        supervisor.lookup("c1")
    assert supervisor.snapshot() == []
    for attachment in (first, second):
        result = live.core.read(attachment, Stream.STDOUT, 2 * len(output))
        assert result.gap is None and result.data == output
        assert live.core.finished_for(attachment) is False
    live.delivered(first, Stream.STDOUT, live.core.read(first, Stream.STDOUT, len(output)))
    assert live.core.finished_for(first)
    supervisor.detach(live, first)
    assert supervisor.pool.total == len(output)  # the second still reads
    supervisor.detach(live, second)
    assert supervisor.pool.total == 0


async def test_ttl_0_keeps_the_output_for_a_watcher_until_the_last_reader_leaves(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    output = bytes(range(33, 127)) * 10_000
    live, (client, watcher) = await finish_with_output(
        supervisor, children, output, 1, watchers=1, ttl_seconds=0
    )
    await trio.sleep(60)  # however long the watcher takes
    with pytest.raises(SessionExpired):
        supervisor.lookup("c1")
    supervisor.detach(live, client)  # the watcher still reads
    result = live.core.read(watcher, Stream.STDOUT, 2 * len(output))
    assert result.gap is None and result.data == output
    assert supervisor.pool.total == len(output)
    supervisor.detach(live, watcher)  # the last reader: the output goes
    assert supervisor.pool.total == 0


async def test_ttl_0_is_gone_for_new_clients_at_the_finish_and_frees_an_unread_output(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, _ = await finish_with_output(supervisor, children, b"x" * 100_000, 0, ttl_seconds=0)
    assert live.core.state is SessionState.EXPIRED
    with pytest.raises(SessionExpired):  # at once, not a scheduler pass later
        supervisor.lookup("c1")
    await trio.sleep(1)
    assert supervisor.pool.total == 0


async def test_a_ttl_expiry_keeps_the_output_for_clients_still_reading_it(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    live, (reader,) = await finish_with_output(supervisor, children, b"y" * 100_000, 1)
    await live.expired.wait()
    with pytest.raises(SessionExpired):
        supervisor.lookup("c1")
    assert live.core.read(reader, Stream.STDOUT, 200_000).data == b"y" * 100_000
    supervisor.detach(live, reader)
    assert supervisor.pool.total == 0


async def _carried_expired(
    supervisor: Supervisor, children: FakeChildren, nursery: trio.Nursery, output: bytes
) -> Supervisor:
    """A ttl-0 session a client still reads, carried into a new supervisor (a live
    upgrade's capture and rebuild, in one process) with a grace of 30 s."""
    await finish_with_output(supervisor, children, output, 1, ttl_seconds=0)
    records = carried.capture(supervisor, trio.current_time())
    assert [r.core.expired for r in records] == [True]
    after = Supervisor(Config(), children.reaper, nursery)
    (live,) = carried.rebuild(after, records, trio.current_time())
    after.restore_counts(supervisor.expired_keys(), 0, 0)
    assert live.core.state is SessionState.EXPIRED
    after.adopt_expired(live, 30.0)
    return after


async def test_a_carried_expired_session_serves_its_returning_client_once(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    output = b"z" * 100_000
    async with trio.open_nursery() as nursery:
        after = await _carried_expired(supervisor, children, nursery, output)
        await trio.sleep(29)
        live = after.lookup("c1")  # its client, back within the grace
        attachment = after.attach(live, 10, 0)
        assert live.core.read(attachment, Stream.STDOUT, len(output)).data == output[10:]
        with pytest.raises(SessionExpired):  # nobody else, from then on
            after.lookup("c1")
        assert after.pool.total == len(output)
        after.detach(live, attachment)
        assert after.pool.total == 0 and after.unread == {}
        nursery.cancel_scope.cancel()


async def test_a_carried_expired_session_nobody_came_back_for_is_freed_after_the_grace(
    fakes: tuple[Supervisor, FakeChildren], autojump_clock: trio.testing.MockClock
) -> None:
    supervisor, children = fakes
    async with trio.open_nursery() as nursery:
        after = await _carried_expired(supervisor, children, nursery, b"z" * 100_000)
        await trio.sleep(30.5)
        with pytest.raises(SessionExpired):
            after.lookup("c1")
        assert after.pool.total == 0 and after.unread == {}
        nursery.cancel_scope.cancel()
