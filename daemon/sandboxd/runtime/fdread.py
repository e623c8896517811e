"""Reading what a non-blocking output fd holds right now, in one call."""

from __future__ import annotations

import errno
import os


def read_available(fd: int, limit: int) -> tuple[bytes | None, bool]:
    """Up to ``limit`` bytes that can be read now: (data, ended).

    ``data`` is None when nothing is ready. ``ended`` is true at EOF, or at EIO, which is
    how a PTY master reports that every holder of its slave has gone.
    """
    parts: list[bytes] = []
    total = 0
    while total < limit:
        try:
            piece = os.read(fd, limit - total)
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return b"".join(parts), True
        if not piece:
            return b"".join(parts), True
        parts.append(piece)
        total += len(piece)
    if not parts:
        return None, False
    return parts[0] if len(parts) == 1 else b"".join(parts), False
