"""The bounded set of expired session ids."""

from __future__ import annotations

import tracemalloc
import uuid

from sandboxd.core.expired import ExpiredIds


def test_the_newest_ids_are_kept_and_the_oldest_go_first() -> None:
    ids = ExpiredIds(3)
    for name in ("a", "b", "c", "d"):
        ids.add(name)
    assert "a" not in ids
    assert all(name in ids for name in ("b", "c", "d"))
    assert len(ids) == 3
    ids.add("b")  # already there: no second slot
    ids.add("e")
    assert "b" not in ids and "e" in ids


def test_a_reused_id_is_forgotten_and_unknown_things_are_not_expired() -> None:
    ids = ExpiredIds(10)
    ids.add("x")
    ids.discard("x")
    assert "x" not in ids and "never" not in ids and 5 not in ids


def test_ten_thousand_ids_take_under_a_megabyte() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ids = ExpiredIds(100_000)
        for _ in range(10_000):
            ids.add(uuid.uuid4().hex)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used < 1_000_000, used
