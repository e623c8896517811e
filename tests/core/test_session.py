"""The session state machine and its timers, as pure functions of ``now``.

Each timer is checked just before (t - ε), at (t) and just after (t + ε) its deadline.
"""

from __future__ import annotations

import math

import pytest

from sandboxd.core.ringbuffer import RingBuffer
from sandboxd.core.session import (
    EndReason,
    ExitStatus,
    Expire,
    IllegalTransition,
    KillTree,
    Lifetimes,
    Session,
    SessionState,
    Stream,
    pacing_cursor,
    ping_due,
    receive_pong,
    start_ping,
)

EPS = 1e-6


def make(started_at: float = 100.0, **lifetimes: object) -> Session:
    return Session(
        command_id="c",
        pid=42,
        lifetimes=Lifetimes(**lifetimes),  # type: ignore[arg-type]
        stdout=RingBuffer(1024),
        stderr=RingBuffer(1024),
        started_at=started_at,
    )


def test_timeout_fires_exactly_at_its_deadline_and_only_once() -> None:
    s = make(timeout_seconds=60, idle_timeout_seconds=-1)
    s.attach(100.0)
    assert s.next_deadline() == 160.0
    assert s.on_timer(160.0 - EPS) == []
    assert s.on_timer(160.0) == [KillTree(EndReason.TIMEOUT)]
    assert s.on_timer(160.0 + EPS) == []
    assert s.next_deadline() == math.inf


def test_timeout_zero_means_no_deadline() -> None:
    s = make(timeout_seconds=0, idle_timeout_seconds=-1)
    s.attach(100.0)
    assert s.next_deadline() == math.inf
    assert s.on_timer(1e9) == []


def test_idle_clock_runs_only_while_no_client_is_attached() -> None:
    s = make(timeout_seconds=0, idle_timeout_seconds=10)
    a = s.attach(100.0)
    assert s.next_deadline() == math.inf  # paused while attached
    assert s.detach(a, 105.0) == []
    assert s.next_deadline() == 115.0
    assert s.on_timer(115.0 - EPS) == []
    b = s.attach(114.0)  # a client comes back: the clock stops ...
    assert s.on_timer(115.0) == []
    s.detach(b, 120.0)  # ... and restarts from zero when it leaves
    assert s.next_deadline() == 130.0
    assert s.on_timer(130.0) == [KillTree(EndReason.IDLE)]


def test_idle_clock_starts_at_creation_when_nobody_attaches() -> None:
    s = make(timeout_seconds=0, idle_timeout_seconds=5)
    assert s.next_deadline() == 105.0


@pytest.mark.parametrize("idle", [-1, 0])
def test_idle_minus_one_and_zero_mean_never(idle: int) -> None:
    s = make(timeout_seconds=0, idle_timeout_seconds=idle)
    assert s.next_deadline() == math.inf
    assert s.on_timer(1e12) == []


def test_the_earlier_of_timeout_and_idle_wins() -> None:
    s = make(timeout_seconds=30, idle_timeout_seconds=10)
    assert s.next_deadline() == 110.0
    s.attach(101.0)
    assert s.next_deadline() == 130.0


def test_kill_on_disconnect_kills_when_the_last_client_leaves() -> None:
    s = make(kill_on_disconnect=True)
    a, b = s.attach(100.0), s.attach(100.0)
    assert s.detach(a, 101.0) == []
    assert s.detach(b, 102.0) == [KillTree(EndReason.DISCONNECT)]


def test_a_second_kill_changes_nothing_and_the_first_reason_is_reported() -> None:
    s = make()
    assert s.request_kill(EndReason.TIMEOUT) == [KillTree(EndReason.TIMEOUT)]
    assert s.request_kill(EndReason.KILLED) == []
    s.finish(200.0, ExitStatus(137, 9))
    assert s.end_reason is EndReason.TIMEOUT
    terminal = s.terminal_message()
    assert terminal.error_type == "CommandTimeout"  # type: ignore[union-attr]


def test_a_command_that_exits_by_itself_during_a_kill_is_reported_as_exited() -> None:
    s = make()
    s.request_kill(EndReason.KILLED)
    s.finish(101.0, ExitStatus(0))
    assert s.end_reason is EndReason.EXITED


def test_ttl_counts_from_the_finish_and_then_expires() -> None:
    s = make(ttl_seconds=600)
    s.finish(200.0, ExitStatus(0))
    assert s.next_deadline() == 800.0
    assert s.on_timer(800.0 - EPS) == []
    assert s.on_timer(800.0) == [Expire()]
    assert s.state is SessionState.EXPIRED


def test_ttl_zero_expires_at_the_finish_and_minus_one_never() -> None:
    s = make(ttl_seconds=0)
    assert s.finish(200.0, ExitStatus(0)) == [Expire()]
    forever = make(ttl_seconds=-1)
    forever.finish(200.0, ExitStatus(0))
    assert forever.next_deadline() == math.inf


def test_illegal_transitions_raise_and_change_nothing() -> None:
    s = make()
    s.finish(200.0, ExitStatus(0))
    with pytest.raises(IllegalTransition):
        s.finish(201.0, ExitStatus(1))
    assert s.state is SessionState.FINISHED and s.status == ExitStatus(0)


def test_exit_frame_carries_signal_name_reason_and_usage() -> None:
    s = make()
    s.request_kill(EndReason.KILLED)
    s.finish(101.0, ExitStatus(137, 9, 0.25, 4096))
    exit_frame = s.terminal_message()
    assert exit_frame.exit_code == 137  # type: ignore[union-attr]
    assert exit_frame.signal == "KILL"  # type: ignore[union-attr]
    assert exit_frame.reason == "killed"  # type: ignore[union-attr]
    assert exit_frame.cpu_seconds == 0.25  # type: ignore[union-attr]


def test_output_is_paced_by_the_slowest_client_keeping_up() -> None:
    # a 1024-byte ring: output runs at most 512 ahead of the slowest pacing client
    s = make()
    s.stdout.append(b"x" * 1000)
    fast = s.attach(100.0, stdout_offset=1000)
    slow = s.attach(100.0, stdout_offset=900)
    assert s.may_read(Stream.STDOUT, 100.0, 412)  # 100 + 412 = 512
    assert not s.may_read(Stream.STDOUT, 100.0, 413)
    slow.stdout_cursor = 1000
    assert s.may_read(Stream.STDOUT, 100.0, 512)
    assert fast.stdout_cursor == 1000


def test_a_client_far_behind_the_leader_stops_pacing_until_it_catches_up() -> None:
    # 256 (a quarter of the ring) behind the leading client is the limit
    s = make()
    s.stdout.append(b"x" * 1000)
    s.attach(100.0, stdout_offset=1000)
    slow = s.attach(100.0, stdout_offset=744)
    assert s.may_read(Stream.STDOUT, 100.0, 256)  # 256 behind: it still paces
    assert not s.may_read(Stream.STDOUT, 100.0, 257)
    slow.stdout_cursor = 743  # one byte further: the fast client alone paces
    assert s.may_read(Stream.STDOUT, 100.0, 512)
    slow.stdout_cursor = 800  # caught up again
    assert not s.may_read(Stream.STDOUT, 100.0, 512)


def test_a_client_that_left_keeps_pacing_for_stall_seconds_and_nothing_else() -> None:
    s = make(idle_timeout_seconds=10)
    s.stdout.append(b"x" * 1000)
    gone = s.attach(100.0, stdout_offset=600)
    assert s.detach(gone, 100.0) == []
    assert s.attachments == [] and s.idle_since == 100.0  # the idle clock runs
    assert s.may_read(Stream.STDOUT, 100.0, 112)  # 400 + 112 = 512
    assert not s.may_read(Stream.STDOUT, 105.0 - EPS, 113)
    assert s.may_read(Stream.STDOUT, 105.0, 113)
    assert s.lingering == []


def test_clients_that_come_and_go_on_a_silent_command_do_not_pile_up() -> None:
    s = make()
    for second in range(100):
        s.detach(s.attach(float(second)), float(second))
    assert len(s.lingering) == 5  # those gone less than stall_seconds (5 s)


def test_clients_of_finished_or_kill_on_disconnect_sessions_do_not_linger() -> None:
    s = make(kill_on_disconnect=True)
    s.stdout.append(b"x" * 1000)
    s.detach(s.attach(100.0), 100.0)
    finished = make()
    finished.stdout.append(b"x" * 1000)
    client = finished.attach(100.0)
    finished.finish(100.0, ExitStatus(0))
    finished.detach(client, 100.0)
    assert s.lingering == [] and finished.lingering == []


def test_a_stalled_client_stops_pacing_after_stall_seconds() -> None:
    s = make()
    s.stdout.append(b"x" * 1000)
    s.attach(100.0, stdout_offset=0)
    assert not s.may_read(Stream.STDOUT, 105.0 - EPS, 100)
    assert s.may_read(Stream.STDOUT, 105.0, 100)


def test_a_client_parked_with_everything_keeps_pacing_however_long_it_waited() -> None:
    s = make()
    s.stdout.append(b"x" * 1000)
    parked = s.attach(100.0, stdout_offset=0)
    parked.waiting = True  # it had everything; the 1000 bytes came while it slept
    assert not s.may_read(Stream.STDOUT, 1000.0, 100)  # 1000 s later it still counts
    parked.waiting = False
    assert s.may_read(Stream.STDOUT, 1000.0, 100)  # a client gone quiet does not


def test_finished_for_means_finished_and_caught_up() -> None:
    s = make()
    s.stdout.append(b"abc")
    a = s.attach(100.0)
    assert not s.finished_for(a)
    s.finish(101.0, ExitStatus(0))
    assert not s.finished_for(a)
    a.stdout_cursor = 3
    assert s.finished_for(a)


def test_with_no_client_attached_reading_never_waits() -> None:
    s = make()
    s.stdout.append(b"x" * 1024)
    assert s.may_read(Stream.STDOUT, 100.0, 65536)


# ---- watchers (reconnect with "watch": true) -----------------------------------------


def test_a_watcher_neither_stops_nor_resets_the_idle_clock() -> None:
    s = make(timeout_seconds=0, idle_timeout_seconds=10)
    a = s.attach(100.0)
    s.detach(a, 105.0)  # the clock starts: due at 115
    w = s.attach(106.0, watch=True)
    assert s.next_deadline() == 115.0  # a watcher does not stop it ...
    assert s.detach(w, 110.0) == []
    assert s.next_deadline() == 115.0  # ... and leaving does not restart it
    assert s.on_timer(115.0) == [KillTree(EndReason.IDLE)]


def test_a_watcher_attached_while_a_client_is_there_leaves_the_clock_paused() -> None:
    s = make(timeout_seconds=0, idle_timeout_seconds=10)
    a = s.attach(100.0)
    w = s.attach(101.0, watch=True)
    assert s.detach(w, 102.0) == []
    assert s.next_deadline() == math.inf  # the client is still attached
    s.detach(a, 103.0)
    assert s.next_deadline() == 113.0


def test_a_watcher_leaving_never_triggers_kill_on_disconnect() -> None:
    s = make(kill_on_disconnect=True)
    w = s.attach(100.0, watch=True)
    assert s.detach(w, 101.0) == []  # nobody attached, but it was only a watcher
    a = s.attach(102.0)
    w2 = s.attach(102.0, watch=True)
    assert s.detach(a, 103.0) == [KillTree(EndReason.DISCONNECT)]  # a watcher is no client
    assert s.detach(w2, 104.0) == []


def test_watchers_are_counted_apart_from_clients() -> None:
    s = make()
    a = s.attach(100.0)
    w = s.attach(100.0, watch=True)
    assert s.attachments == [a] and s.watchers == [w]
    assert w.watch and not a.watch


def test_a_watcher_that_keeps_up_paces_the_command_like_a_client() -> None:
    s = make()
    s.stdout.append(b"x" * 1000)
    s.attach(100.0, stdout_offset=1000)
    s.attach(100.0, stdout_offset=900, watch=True)
    assert s.may_read(Stream.STDOUT, 100.0, 412)  # 100 + 412 = 512 ahead of the watcher
    assert not s.may_read(Stream.STDOUT, 100.0, 413)


def test_a_watcher_cut_off_lingers_for_pacing_like_a_client() -> None:
    s = make()  # stall_seconds is 5
    s.stdout.append(b"x" * 1000)
    w = s.attach(100.0, stdout_offset=900, watch=True)
    s.detach(w, 101.0)
    assert s.lingering == [w]
    assert not s.may_read(Stream.STDOUT, 102.0, 413)
    assert s.may_read(Stream.STDOUT, 106.0, 413)  # gone stall_seconds: no longer paces


# ---- acknowledged delivery ---------------------------------------------------------


def test_a_pong_acknowledges_what_was_written_before_its_ping_and_nothing_else() -> None:
    s = make()
    s.stdout.append(b"x" * 1000)
    a = s.attach(100.0)
    assert ping_due(a)  # none sent yet
    a.stdout_cursor, a.stderr_cursor = 300, 0
    payload = start_ping(a, 100.0)
    assert len(payload) <= 125
    a.stdout_cursor = 700  # written after the ping
    assert not ping_due(a)  # one outstanding at a time
    assert not receive_pong(a, b"unsolicited", 100.1)
    assert not a.delivery.answered
    assert receive_pong(a, payload, 100.2)
    assert (a.delivery.acked(Stream.STDOUT), a.delivery.acked(Stream.STDERR)) == (300, 0)
    assert not receive_pong(a, payload, 100.3)  # a repeated pong changes nothing
    assert ping_due(a)  # 400 written since that ping: the next one is due
    start_ping(a, 100.3)
    assert not ping_due(a)
    assert receive_pong(a, b"sandboxd 2", 100.4)
    assert a.delivery.acked(Stream.STDOUT) == 700
    assert not ping_due(a)  # everything acknowledged: nothing to ask about


def test_a_client_that_answers_paces_by_what_it_acknowledged_not_what_was_written() -> None:
    # a 1024-byte ring: output runs at most 512 ahead of the acknowledged offset
    s = make()
    a = s.attach(100.0)
    start_ping(a, 100.0)
    receive_pong(a, b"sandboxd 1", 100.0)
    s.stdout.append(b"x" * 600)
    a.stdout_cursor = 600  # written, in flight
    start_ping(a, 100.0)
    assert pacing_cursor(a, Stream.STDOUT, 100.0, 5.0, attached=True) == 0
    assert not s.may_read(Stream.STDOUT, 100.0, 1)  # 600 ahead of what it acknowledged
    receive_pong(a, b"sandboxd 2", 101.0)
    assert s.may_read(Stream.STDOUT, 101.0, 512)


def test_a_client_that_never_answers_paces_by_its_written_cursor() -> None:
    s = make()
    s.stdout.append(b"x" * 600)
    a = s.attach(100.0, stdout_offset=600)
    start_ping(a, 100.0)  # never answered
    assert pacing_cursor(a, Stream.STDOUT, 104.0, 5.0, attached=True) == 600
    assert s.may_read(Stream.STDOUT, 104.0, 512)
    assert pacing_cursor(a, Stream.STDOUT, 105.0, 5.0, attached=True) is None  # stalled


def test_a_client_whose_answers_stop_for_stall_seconds_falls_back_to_its_written_cursor() -> None:
    s = make()
    a = s.attach(100.0)
    start_ping(a, 100.0)
    receive_pong(a, b"sandboxd 1", 100.0)
    s.stdout.append(b"x" * 600)
    a.advance(Stream.STDOUT, s.read(a, Stream.STDOUT, 600), 100.0)
    start_ping(a, 100.0)  # and no pong ever comes, though it keeps taking output
    assert pacing_cursor(a, Stream.STDOUT, 105.0 - EPS, 5.0, attached=True) == 0
    a.last_progress = 104.0
    assert pacing_cursor(a, Stream.STDOUT, 105.0, 5.0, attached=True) == 600
    # one that takes nothing either stops pacing, as any stalled client
    assert pacing_cursor(a, Stream.STDOUT, 109.0, 5.0, attached=True) is None
    assert s.may_read(Stream.STDOUT, 109.0, 1024)


def test_answers_that_stop_with_no_ping_outstanding_also_go_stale() -> None:
    # pong in hand, output written since, and the write that would carry the next ping
    # never completes (the client stopped reading): it cannot pin the command
    s = make()
    a = s.attach(100.0)
    start_ping(a, 100.0)
    receive_pong(a, b"sandboxd 1", 101.0)
    a.stdout_cursor = 400
    assert pacing_cursor(a, Stream.STDOUT, 106.0 - EPS, 5.0, attached=True) == 0
    assert pacing_cursor(a, Stream.STDOUT, 106.0, 5.0, attached=True) is None
    a.stdout_cursor = 0
    a.waiting = True  # parked with everything acknowledged: it paces however long it waits
    assert pacing_cursor(a, Stream.STDOUT, 1000.0, 5.0, attached=True) == 0


def test_a_dropped_client_lingers_at_what_it_acknowledged() -> None:
    s = make()
    s.stdout.append(b"x" * 1000)
    a = s.attach(100.0)
    start_ping(a, 100.0)
    receive_pong(a, b"sandboxd 1", 100.0)  # acknowledged 0
    a.stdout_cursor = 1000  # written, then the connection dropped
    s.detach(a, 100.0)
    assert s.lingering == [a]
    assert not s.may_read(Stream.STDOUT, 105.0 - EPS, 1)  # 1000 ahead of offset 0
    assert s.may_read(Stream.STDOUT, 105.0, 512)  # gone stall_seconds: forgotten
    unpinged = s.attach(105.0, stdout_offset=1000)
    s.detach(unpinged, 105.0)  # never pinged (ASGI): it lingers at what was written
    s.stdout.append(b"x" * 100)
    assert s.may_read(Stream.STDOUT, 106.0, 412) and not s.may_read(Stream.STDOUT, 106.0, 413)


def test_a_client_dropped_before_its_first_pong_lingers_at_its_attach_offsets() -> None:
    s = make()
    s.stdout.append(b"x" * 1000)
    a = s.attach(100.0, stdout_offset=200)
    start_ping(a, 100.0)  # behind `started`; the connection drops before the pong
    a.stdout_cursor = 1000
    assert pacing_cursor(a, Stream.STDOUT, 100.0, 5.0, attached=True) == 1000  # (c): written
    s.detach(a, 100.0)
    assert pacing_cursor(a, Stream.STDOUT, 100.0, 5.0, attached=False) == 200
    assert not s.may_read(Stream.STDOUT, 101.0, 1)


def test_a_slow_client_far_behind_on_acknowledgements_stops_pacing() -> None:
    # the lag rule compares the offsets each client paces by: here, acknowledged ones
    s = make()
    s.stdout.append(b"x" * 1000)
    fast, slow = s.attach(100.0), s.attach(100.0)
    for client, acked in ((fast, 1000), (slow, 743)):
        client.stdout_cursor = acked
        start_ping(client, 100.0)
        receive_pong(client, b"sandboxd 1", 100.0)
        client.stdout_cursor = 1000  # both have everything written
    assert s.may_read(Stream.STDOUT, 100.0, 512)  # 257 behind the leader: not pacing
    slow.delivery.acked_stdout = 744
    assert not s.may_read(Stream.STDOUT, 100.0, 257)


def test_a_watcher_that_answers_paces_by_what_it_acknowledged_like_a_client() -> None:
    s = make()
    w = s.attach(100.0, watch=True)
    assert w.delivery.acked(Stream.STDOUT) == 0
    start_ping(w, 100.0)
    receive_pong(w, b"sandboxd 1", 100.0)
    s.stdout.append(b"x" * 600)
    w.stdout_cursor = 600  # written to the watcher, in flight
    start_ping(w, 100.0)
    assert not s.may_read(Stream.STDOUT, 100.0, 1)  # 600 ahead of what it acknowledged
    receive_pong(w, b"sandboxd 2", 100.5)
    assert s.may_read(Stream.STDOUT, 100.5, 512)


def test_a_watcher_dropped_lingers_at_what_it_acknowledged() -> None:
    s = make()
    s.stdout.append(b"x" * 1000)
    w = s.attach(100.0, stdout_offset=200, watch=True)
    start_ping(w, 100.0)  # dropped before its first pong
    w.stdout_cursor = 1000
    s.detach(w, 100.0)
    assert s.lingering == [w]
    assert not s.may_read(Stream.STDOUT, 101.0, 1)  # 800 ahead of its attach offset


# ---- the grace after a live upgrade ------------------------------------------------------


def test_clients_closed_by_an_upgrade_do_not_kill_on_disconnect_within_the_grace() -> None:
    s = make(kill_on_disconnect=True, timeout_seconds=0, idle_timeout_seconds=0)
    a = s.attach(100.0)
    s.begin_grace(110.0, 30.0)
    assert s.detach(a, 110.0) == []
    assert s.next_deadline() == 140.0
    assert s.on_timer(139.0) == []
    b = s.attach(120.0)  # it came back: the normal rules again
    assert s.grace_until is None
    assert s.detach(b, 150.0) == [KillTree(EndReason.DISCONNECT)]


def test_a_grace_nobody_returns_within_ends_as_a_disconnect_at_its_end() -> None:
    s = make(kill_on_disconnect=True, timeout_seconds=0, idle_timeout_seconds=0)
    a = s.attach(100.0)
    s.begin_grace(110.0, 30.0)
    s.detach(a, 110.0)
    assert s.on_timer(140.0) == [KillTree(EndReason.DISCONNECT)]


def test_the_idle_clock_starts_only_when_the_grace_runs_out() -> None:
    s = make(timeout_seconds=0, idle_timeout_seconds=20)
    a = s.attach(100.0)
    s.begin_grace(110.0, 30.0)
    s.detach(a, 110.0)
    assert s.idle_since is None
    assert s.next_deadline() == 140.0
    assert s.on_timer(140.0) == []
    assert s.idle_since == 140.0
    assert s.next_deadline() == 160.0
    assert s.on_timer(160.0) == [KillTree(EndReason.IDLE)]


def test_a_session_without_clients_gets_no_grace() -> None:
    s = make(kill_on_disconnect=True)
    s.begin_grace(110.0, 30.0)
    assert s.grace_until is None
