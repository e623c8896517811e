"""The ids of sessions whose TTL ran out, so that a late reconnect hears ``SessionExpired``
rather than ``CommandNotFound``.

Only the newest ``capacity`` ids are kept, each as a 64-bit hash in a set and a FIFO
(about 70 bytes an id, against about 230 for the id strings in an ordered dict). Two ids
sharing a hash is a 1-in-2**64 event whose only effect is that a never-seen id would be
called expired instead of not found.
"""

from __future__ import annotations

import hashlib
from collections import deque


def _key(command_id: str) -> int:
    digest = hashlib.blake2b(command_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ExpiredIds:
    """A bounded, first-in first-out set of expired command ids."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: set[int] = set()
        self._order: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, command_id: object) -> bool:
        return isinstance(command_id, str) and _key(command_id) in self._keys

    def add(self, command_id: str) -> None:
        """Remember ``command_id``; the oldest goes when the capacity is reached."""
        key = _key(command_id)
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        while len(self._order) > self.capacity:
            self._keys.discard(self._order.popleft())

    def discard(self, command_id: str) -> None:
        """Forget ``command_id`` (a new session took the id). Its FIFO slot stays until it
        reaches the front, where removing it again is harmless."""
        self._keys.discard(_key(command_id))

    def keys(self) -> list[int]:
        """The remembered ids' hashes, oldest first (what a live upgrade carries)."""
        return [key for key in self._order if key in self._keys]

    def restore(self, keys: list[int]) -> None:
        """Remember these hashes (from ``keys``), oldest first."""
        for key in keys:
            if key not in self._keys:
                self._keys.add(key)
                self._order.append(key)
        while len(self._order) > self.capacity:
            self._keys.discard(self._order.popleft())
