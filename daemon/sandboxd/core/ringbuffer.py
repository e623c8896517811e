"""Byte-bounded output buffers with absolute offsets, and the global cap across them.

A ``RingBuffer`` keeps the most recent output of one stream as a list of chunks, each a
whole sanitised read (so chunk edges are code-point boundaries). Offsets are absolute:
byte N of the stream keeps the number N after older bytes are evicted. Reading from an
evicted offset says so, with the range that is gone.

``BufferPool`` bounds the bytes held by all rings together. When an append takes the total
past the cap, it evicts, in this order:

1. finished commands' output, the command that finished first going first, oldest bytes
   first within it;
2. then running commands' output, always from the ring that holds the most, oldest first.

A ring may also exceed its own capacity by less than one chunk, because eviction drops
whole chunks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What ``RingBuffer.read_from`` found.

    ``offset`` is where ``data`` starts (never before the offset asked for). When the
    bytes asked for were already evicted, ``gap`` is the ``(from, to)`` range lost.
    """

    offset: int
    data: bytes
    gap: tuple[int, int] | None = None


class RingBuffer:
    """The retained tail of one output stream, addressed by absolute byte offset."""

    __slots__ = ("_chunks", "_head", "_pool", "_starts", "capacity", "end", "size")

    def __init__(self, capacity: int, pool: BufferPool | None = None) -> None:
        self.capacity = capacity
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._head = 0  # index of the oldest retained chunk
        self.end = 0  # offset one past the last byte ever appended
        self.size = 0  # bytes retained
        self._pool = pool

    @property
    def start(self) -> int:
        """Offset of the oldest retained byte (== ``end`` when nothing is retained)."""
        return self.end - self.size

    def append(self, data: bytes) -> None:
        """Add valid UTF-8 output; evicts the oldest chunks past capacity."""
        if not data:
            return
        self._chunks.append(data)
        self._starts.append(self.end)
        self.end += len(data)
        self.size += len(data)
        while self.size > self.capacity and self.evict_oldest():
            pass
        if self._pool is not None:
            self._pool.grew(self, len(data))

    def evict_oldest(self) -> int:
        """Drop the oldest chunk; returns how many bytes that freed (0 when empty)."""
        if self._head >= len(self._chunks):
            return 0
        freed = len(self._chunks[self._head])
        self._chunks[self._head] = b""
        self._head += 1
        self.size -= freed
        if self._head > 64 and self._head * 2 > len(self._chunks):
            del self._chunks[: self._head]
            del self._starts[: self._head]
            self._head = 0
        if self._pool is not None:
            self._pool.shrank(freed)
        return freed

    def retained(self) -> list[bytes]:
        """The retained chunks, oldest first (each a whole sanitised read)."""
        return self._chunks[self._head :]

    def restore(self, start: int, chunks: list[bytes]) -> None:
        """Refill a new, empty ring: its oldest retained byte is ``start``; raises
        ``ValueError`` on a ring that already holds output."""
        if self.end or self._chunks:
            raise ValueError("restore into a ring that is not new")
        self.end = start
        for chunk in chunks:
            self.append(chunk)

    def clear(self) -> None:
        """Drop everything retained (the session is gone)."""
        while self.evict_oldest():
            pass

    def read_from(self, offset: int, max_bytes: int) -> ReadResult:
        """Up to ``max_bytes`` of output starting at ``offset``, cut at a code-point edge.

        An offset before the retained start reads from the start and reports the gap. An
        offset inside a character moves forward to the next character, so nothing before
        ``offset`` is ever returned. At or past ``end`` the data is empty.
        """
        gap = None
        start = self.start
        if offset < start:
            gap = (offset, start)
            offset = start
        if offset >= self.end:
            return ReadResult(offset, b"", gap)
        index = bisect.bisect_right(self._starts, offset, lo=self._head) - 1
        skip = offset - self._starts[index]
        chunk = self._chunks[index]
        while skip < len(chunk) and (chunk[skip] & 0xC0) == 0x80:
            skip += 1  # never start inside a character
            offset += 1
        pieces: list[bytes] = []
        wanted = max_bytes
        while wanted > 0 and index < len(self._chunks):
            chunk = self._chunks[index]
            piece = chunk[skip : skip + wanted] if (skip or len(chunk) - skip > wanted) else chunk
            pieces.append(piece)
            wanted -= len(piece)
            skip = 0
            index += 1
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(data) == max_bytes and offset + len(data) < self.end:
            # Cut back to the start of a character: the byte after the cut must not
            # be a continuation byte.
            cut = len(data)
            following = self._byte_at(offset + cut)
            while cut > 0 and following is not None and (following & 0xC0) == 0x80:
                cut -= 1
                following = data[cut]
            data = data[:cut]
        return ReadResult(offset, data, gap)

    def _byte_at(self, offset: int) -> int | None:
        if offset >= self.end or offset < self.start:
            return None
        index = bisect.bisect_right(self._starts, offset, lo=self._head) - 1
        return self._chunks[index][offset - self._starts[index]]


class BufferPool:
    """The global cap on bytes held by all rings, and the eviction order past it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        self._live: dict[RingBuffer, None] = {}
        self._retired: dict[RingBuffer, None] = {}  # insertion order = finishing order
        self._evicting = False

    def ring(self, capacity: int) -> RingBuffer:
        """A new ring of a running command, accounted in this pool."""
        ring = RingBuffer(capacity, self)
        self._live[ring] = None
        return ring

    def retire(self, ring: RingBuffer) -> None:
        """The ring's command finished: its bytes are now first in line for eviction."""
        if self._live.pop(ring, 0) is None:
            self._retired[ring] = None

    def release(self, ring: RingBuffer) -> None:
        """The ring's session is gone: free its bytes and forget it."""
        self._live.pop(ring, None)
        self._retired.pop(ring, None)
        ring.clear()

    def grew(self, ring: RingBuffer, nbytes: int) -> None:
        """Called by a ring after an append."""
        self.total += nbytes
        if self.total > self.cap and not self._evicting:
            self._evicting = True
            try:
                self._evict()
            finally:
                self._evicting = False

    def shrank(self, nbytes: int) -> None:
        """Called by a ring after an eviction."""
        self.total -= nbytes

    def _evict(self) -> None:
        while self.total > self.cap and self._retired:
            oldest = next(iter(self._retired))
            if not oldest.evict_oldest():
                del self._retired[oldest]
        while self.total > self.cap and self._live:
            largest = max(self._live, key=lambda r: r.size)
            if not largest.evict_oldest():
                break
