"""Ring buffers with absolute offsets, and the global cap across them."""

from __future__ import annotations

from sandboxd.core.ringbuffer import BufferPool, ReadResult, RingBuffer


def test_offsets_are_absolute_and_survive_eviction() -> None:
    ring = RingBuffer(capacity=10)
    for piece in (b"aaaa", b"bbbb", b"cccc"):
        ring.append(piece)
    assert (ring.start, ring.end, ring.size) == (4, 12, 8)
    assert ring.read_from(4, 100) == ReadResult(4, b"bbbbcccc")
    assert ring.read_from(6, 3) == ReadResult(6, b"bbc")


def test_reading_evicted_bytes_starts_at_the_oldest_and_names_the_gap() -> None:
    ring = RingBuffer(capacity=10)
    for piece in (b"aaaa", b"bbbb", b"cccc"):
        ring.append(piece)
    assert ring.read_from(1, 100) == ReadResult(4, b"bbbbcccc", gap=(1, 4))


def test_reading_at_or_past_the_end_is_empty_and_never_before_the_offset() -> None:
    ring = RingBuffer(capacity=100)
    ring.append(b"abc")
    assert ring.read_from(3, 10) == ReadResult(3, b"")
    assert ring.read_from(50, 10) == ReadResult(50, b"")


def test_a_read_is_cut_back_to_a_character_boundary() -> None:
    ring = RingBuffer(capacity=100)
    ring.append("aé€".encode())  # a(1) é(2) €(3)
    assert ring.read_from(0, 2) == ReadResult(0, b"a")
    assert ring.read_from(0, 4) == ReadResult(0, "aé".encode())
    assert ring.read_from(0, 6) == ReadResult(0, "aé€".encode())


def test_a_read_from_inside_a_character_moves_forward_to_the_next_one() -> None:
    ring = RingBuffer(capacity=100)
    ring.append("é€x".encode())
    assert ring.read_from(1, 100) == ReadResult(2, "€x".encode())


def test_a_read_joins_chunks_up_to_the_limit() -> None:
    ring = RingBuffer(capacity=100)
    for piece in (b"ab", b"cd", b"ef"):
        ring.append(piece)
    assert ring.read_from(1, 4) == ReadResult(1, b"bcde")


def test_long_histories_compact_without_losing_offsets() -> None:
    ring = RingBuffer(capacity=1000)
    for i in range(10_000):
        ring.append(b"%09d\n" % i)
    assert ring.end == 100_000
    assert ring.read_from(ring.end - 10, 100) == ReadResult(99_990, b"000009999\n")


def test_the_pool_evicts_finished_sessions_first_oldest_first() -> None:
    pool = BufferPool(cap=30)
    running = pool.ring(100)
    first_done = pool.ring(100)
    second_done = pool.ring(100)
    running.append(b"r" * 10)
    first_done.append(b"1" * 10)
    second_done.append(b"2" * 10)
    pool.retire(first_done)
    pool.retire(second_done)
    running.append(b"R" * 10)  # 40 > 30
    assert (running.size, first_done.size, second_done.size) == (20, 0, 10)
    assert pool.total == 30


def test_the_pool_then_evicts_from_the_largest_running_stream() -> None:
    pool = BufferPool(cap=30)
    small, big = pool.ring(100), pool.ring(100)
    small.append(b"s" * 5)
    for _ in range(5):
        big.append(b"b" * 5)
    big.append(b"b" * 5)  # 35 > 30
    assert (small.size, big.size) == (5, 25)
    assert pool.total == 30


def test_releasing_a_ring_returns_its_bytes() -> None:
    pool = BufferPool(cap=1000)
    ring = pool.ring(100)
    ring.append(b"x" * 50)
    pool.release(ring)
    assert pool.total == 0 and ring.size == 0
