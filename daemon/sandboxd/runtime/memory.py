"""The C heap under the Python one: glibc malloc settings that keep the daemon's RSS
where its work leaves it.

glibc gives each thread that allocates its own arena and keeps freed memory inside the
heap until something asks for it back. The worker threads that spawn commands and read
files, and the bursts of output sandboxd buffers, would otherwise leave its RSS a few MB
higher after every busy spell. Both calls are no-ops off glibc.

The cyclic collector (``settle_gc``) is set up for a daemon whose objects are mostly
made at start-up and whose every command makes a few hundred short-lived ones.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

import trio

_M_ARENA_MAX = -8
#: How often the heap is trimmed, when commands ran since the last time.
TRIM_INTERVAL = 10.0


#: Net allocations between collections of the youngest generation (CPython's default is
#: 700: a command's tasks, frames, scopes and messages made one almost every command).
GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once start-up is done: freeze what exists (modules, the app: never garbage, and
    otherwise walked by every full collection), collect the young generation less often,
    and (re-)enable the collector. Reference counting frees nearly everything a command
    makes at once. (No full collection first: it took some 25 ms of a live upgrade's
    swap, for the few thousand objects start-up leaves, which the freeze keeps.)"""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    gc.enable()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would); False if not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, arenas) == 1)


def trim_heap() -> bool:
    """Give the heap's free pages back to the kernel; True if any were."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    return malloc_trim is not None and bool(malloc_trim(0) == 1)


async def keep_trimmed(activity: Callable[[], int], interval: float = TRIM_INTERVAL) -> None:
    """Every ``interval`` seconds, trim the heap if ``activity()`` changed since the last
    time (a count of commands started: an idle daemon is left alone)."""
    last = activity()
    while True:
        await trio.sleep(interval)
        now = activity()
        if now != last:
            last = now
            trim_heap()
