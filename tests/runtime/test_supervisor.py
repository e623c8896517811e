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
from sandboxd.core.errors import CommandNotFound, SessionExpired
from sandboxd.core.messages import Execute
from sandboxd.core.session import ExitStatus, SessionState
from sandboxd.runtime import process
from sandboxd.runtime.supervisor import Supervisor


class FakeReaper(process.Reaper):
    def watch(
        self,
        child: process.Child,
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

    def spawn(self, request: process.SpawnRequest) -> process.Child:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.next_pid += 1
        self.writers[self.next_pid] = [out_w, err_w]
        return process.Child(self.next_pid, out_r, err_r, None, False)

    def write(self, pid: int, data: bytes) -> None:
        os.write(self.writers[pid][0], data)

    def exit(self, pid: int, status: ExitStatus) -> None:
        for fd in self.writers.pop(pid, []):
            os.close(fd)
        self.reaper._owners.pop(pid)(status)

    def kill_tree(self, pid: int, signo: int, command_id: str | None = None) -> None:
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
