"""Core sessions and rings to and from their handover form (``handover.py``).

Pure: the caller passes ``now`` (its trio clock) to both sides. Every time becomes a
duration relative to ``now`` at the snapshot and is put back relative to ``now`` at the
restore, so ``restore_core(snapshot_core(s, t), t + d)`` is ``s`` with every time moved by
``d``. The new image passes ``now - swap`` to make the swap count as time that passed.

Clients (attachments, watchers, lingering cursors, acknowledged delivery) are per
connection and are not carried: every client is closed by the upgrade and reattaches from
its own offsets.
"""

from __future__ import annotations

from sandboxd.core.handover import CoreState, ExitState, RingState
from sandboxd.core.ringbuffer import RingBuffer
from sandboxd.core.session import EndReason, ExitStatus, Lifetimes, Session, SessionState


def snapshot_ring(ring: RingBuffer) -> RingState:
    """The retained output of ``ring`` and where it starts."""
    return RingState(capacity=ring.capacity, start=ring.start, chunks=list(ring.retained()))


def restore_ring(state: RingState, ring: RingBuffer) -> RingBuffer:
    """Fill the new ``ring`` (made with ``state.capacity``) from ``state``."""
    ring.restore(state.start, state.chunks)
    return ring


def snapshot_exit(status: ExitStatus) -> ExitState:
    """An exit status in handover form."""
    return ExitState(
        code=status.code,
        signal=status.signal,
        cpu_seconds=status.cpu_seconds,
        peak_rss_bytes=status.peak_rss_bytes,
    )


def restore_exit(state: ExitState) -> ExitStatus:
    """An exit status back from handover form."""
    return ExitStatus(state.code, state.signal, state.cpu_seconds, state.peak_rss_bytes)


def _ago(now: float, when: float | None) -> float | None:
    return None if when is None else now - when


def snapshot_core(session: Session, now: float) -> CoreState:
    """``session`` without its clients, its times made durations before ``now`` (an
    expired one is carried as finished with ``expired``: a client still reads it)."""
    expired = session.state is SessionState.EXPIRED
    lt = session.lifetimes
    grace = session.grace_until
    return CoreState(
        command_id=session.command_id,
        pid=session.pid,
        timeout_seconds=lt.timeout_seconds,
        idle_timeout_seconds=lt.idle_timeout_seconds,
        ttl_seconds=lt.ttl_seconds,
        kill_on_disconnect=lt.kill_on_disconnect,
        stall_seconds=session.stall_seconds,
        state=SessionState.FINISHED.value if expired else session.state.value,
        expired=expired,
        started_ago=now - session.started_at,
        idle_ago=_ago(now, session.idle_since),
        ended_ago=_ago(now, session.ended_at),
        grace_left=None if grace is None else grace - now,
        kill_reason=session.kill_reason.value if session.kill_reason else None,
        end_reason=session.end_reason.value if session.end_reason else None,
        status=snapshot_exit(session.status) if session.status else None,
    )


def restore_core(state: CoreState, now: float, stdout: RingBuffer, stderr: RingBuffer) -> Session:
    """The session ``state`` describes, its times put back before/after ``now`` (EXPIRED
    when it crossed ``expired``); raises ``ValueError`` on a state that names no known
    state or reason."""
    session = Session(
        command_id=state.command_id,
        pid=state.pid,
        lifetimes=Lifetimes(
            timeout_seconds=state.timeout_seconds,
            idle_timeout_seconds=state.idle_timeout_seconds,
            ttl_seconds=state.ttl_seconds,
            kill_on_disconnect=state.kill_on_disconnect,
        ),
        stdout=stdout,
        stderr=stderr,
        started_at=now - state.started_ago,
        stall_seconds=state.stall_seconds,
        state=SessionState(state.state),
    )
    if session.state is SessionState.EXPIRED:
        raise ValueError("an expired session is not carried")
    # (after construction: __post_init__ would start an idle clock that was not running)
    session.idle_since = None if state.idle_ago is None else now - state.idle_ago
    session.ended_at = None if state.ended_ago is None else now - state.ended_ago
    session.grace_until = None if state.grace_left is None else now + state.grace_left
    session.kill_reason = EndReason(state.kill_reason) if state.kill_reason else None
    session.end_reason = EndReason(state.end_reason) if state.end_reason else None
    session.status = restore_exit(state.status) if state.status else None
    if session.state is SessionState.FINISHED and (
        session.ended_at is None or session.status is None or session.end_reason is None
    ):
        raise ValueError("a finished session without its end")
    if state.expired:
        if session.state is not SessionState.FINISHED:
            raise ValueError("an expired session that did not finish")
        session.state = SessionState.EXPIRED
    return session
