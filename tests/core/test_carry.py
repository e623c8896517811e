"""Core sessions and rings cross a live upgrade as durations: restore(snapshot(s, t),
t + d) is s with every time moved by d."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.core.carry import restore_core, restore_ring, snapshot_core, snapshot_ring
from sandboxd.core.expired import ExpiredIds
from sandboxd.core.handover import Binding, HandoverState, seal, unseal
from sandboxd.core.ringbuffer import BufferPool, RingBuffer
from sandboxd.core.session import EndReason, ExitStatus, Lifetimes, Session, SessionState

_times = st.floats(min_value=0, max_value=1e5, allow_nan=False)


def _session(now: float, data: st.DataObject) -> Session:
    pool = BufferPool(1 << 30)
    session = Session(
        command_id="c",
        pid=7,
        lifetimes=Lifetimes(
            timeout_seconds=data.draw(st.integers(0, 1000)),
            idle_timeout_seconds=data.draw(st.integers(-1, 1000)),
            ttl_seconds=data.draw(st.integers(-1, 1000)),
            kill_on_disconnect=data.draw(st.booleans()),
        ),
        stdout=pool.ring(1 << 16),
        stderr=pool.ring(1 << 16),
        started_at=now - data.draw(_times),
        stall_seconds=5.0,
    )
    session.idle_since = data.draw(st.none() | _times.map(lambda a: now - a))
    session.grace_until = data.draw(st.none() | _times.map(lambda a: now + a))
    session.kill_reason = data.draw(st.none() | st.sampled_from(EndReason))
    if data.draw(st.booleans()):
        session.state = SessionState.FINISHED
        session.ended_at = now - data.draw(_times)
        session.status = ExitStatus(data.draw(st.integers(0, 255)), None, 0.5, None)
        session.end_reason = data.draw(st.sampled_from(EndReason))
    return session


def _times_of(session: Session) -> list[float | None]:
    return [session.started_at, session.idle_since, session.ended_at, session.grace_until]


@settings(max_examples=300, deadline=None)
@given(st.data(), _times, st.floats(min_value=-100, max_value=100, allow_nan=False))
def test_restore_of_a_snapshot_is_the_session_shifted(
    data: st.DataObject, now: float, shift: float
) -> None:
    before = _session(now, data)
    state = snapshot_core(before, now)
    pool = BufferPool(1 << 30)
    after = restore_core(state, now + shift, pool.ring(1 << 16), pool.ring(1 << 16))
    for old, new in zip(_times_of(before), _times_of(after), strict=True):
        if old is None:
            assert new is None
        else:
            assert new == pytest.approx(old + shift, abs=1e-6)
    for name in ("command_id", "pid", "lifetimes", "stall_seconds", "state"):
        assert getattr(after, name) == getattr(before, name)
    for name in ("kill_reason", "status", "end_reason"):
        assert getattr(after, name) == getattr(before, name)
    # the next deadline moved by exactly the shift
    old_deadline, new_deadline = before.next_deadline(), after.next_deadline()
    if old_deadline == float("inf"):
        assert new_deadline == old_deadline
    else:
        assert new_deadline == pytest.approx(old_deadline + shift, abs=1e-6)


def test_a_timer_fires_at_its_original_deadline_across_a_snapshot() -> None:
    pool = BufferPool(1 << 20)
    session = Session(
        command_id="c",
        pid=7,
        lifetimes=Lifetimes(timeout_seconds=10),
        stdout=pool.ring(1 << 16),
        stderr=pool.ring(1 << 16),
        started_at=100.0,
    )
    state = snapshot_core(session, 104.0)  # 6 s left
    # the new image's clock reads 5000 at the restore, and the swap took 0.25 s
    restored = restore_core(state, 5000.0 - 0.25, pool.ring(1 << 16), pool.ring(1 << 16))
    assert restored.next_deadline() == pytest.approx(5000.0 + 6 - 0.25)
    assert restored.on_timer(5005.0) == []


def test_an_expired_session_crosses_as_expired_with_its_end() -> None:
    pool = BufferPool(1 << 20)
    session = Session("c", 1, Lifetimes(ttl_seconds=0), pool.ring(1 << 16), pool.ring(1 << 16), 0.0)
    session.state = SessionState.EXPIRED
    session.ended_at, session.end_reason = 0.5, EndReason.EXITED
    session.status = ExitStatus(3, None, 0.0, None)
    state = snapshot_core(session, 1.0)
    assert state.expired and state.state == "finished"
    restored = restore_core(state, 10.0, pool.ring(1 << 16), pool.ring(1 << 16))
    assert restored.state is SessionState.EXPIRED
    assert restored.status == session.status and restored.ended_at == pytest.approx(9.5)


def test_an_expired_session_that_never_finished_is_refused() -> None:
    pool = BufferPool(1 << 20)
    session = Session("c", 1, Lifetimes(), pool.ring(1 << 16), pool.ring(1 << 16), 0.0)
    state = snapshot_core(session, 1.0)
    state.expired = True
    with pytest.raises(ValueError, match="expired"):
        restore_core(state, 2.0, pool.ring(1 << 16), pool.ring(1 << 16))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=40).map(str.encode), max_size=30),
    st.integers(1, 200),
)
def test_a_ring_round_trips_with_its_offsets(chunks: list[bytes], capacity: int) -> None:
    ring = RingBuffer(capacity)
    for chunk in chunks:
        ring.append(chunk)
    state = snapshot_ring(ring)
    # and through a sealed blob, as it really crosses
    binding = Binding(pid=1, boot_id="b", start_ticks=1)
    crossed = unseal(seal(HandoverState("v", 0, 0, 0, -1, [], expired_keys=[]), binding), binding)
    assert crossed.version == "v"
    pool = BufferPool(1 << 30)
    copy = restore_ring(state, pool.ring(capacity))
    assert (copy.start, copy.end, copy.size) == (ring.start, ring.end, ring.size)
    for offset in range(max(0, ring.start - 2), ring.end + 2):
        assert copy.read_from(offset, 17) == ring.read_from(offset, 17)
    assert pool.total == ring.size


def test_a_restore_into_a_used_ring_is_refused() -> None:
    ring = RingBuffer(100)
    ring.append(b"x")
    with pytest.raises(ValueError, match="not new"):
        ring.restore(0, [b"y"])


def test_expired_ids_round_trip_in_order() -> None:
    ids = ExpiredIds(3)
    for name in "abcd":
        ids.add(name)
    ids.discard("c")
    copy = ExpiredIds(3)
    copy.restore(ids.keys())
    assert [n in copy for n in "abcd"] == [False, True, False, True]
    copy.add("e")
    copy.add("f")  # past the capacity the oldest ("b") goes first
    assert [n in copy for n in "bdef"] == [False, True, True, True]
