"""Incremental UTF-8 sanitiser for command output.

Offsets on the wire count UTF-8 bytes of the ``data`` the client receives (protocol.md
§2.6). So invalid bytes become U+FFFD *before* anything is counted or buffered, and an
incomplete sequence at the end of a read is held back until the next read completes it
(or the stream ends, when it too becomes U+FFFD). What comes out is always valid UTF-8.
"""

from __future__ import annotations

import codecs


class Utf8Sanitizer:
    """Turns a byte stream, fed in arbitrary pieces, into valid UTF-8."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> bytes:
        """Sanitise the next piece; may hold back up to 3 bytes of a split character."""
        if data.isascii() and not self._decoder.getstate()[0]:
            return data  # the common case: nothing to check, nothing held back
        return self._decoder.decode(data).encode()

    def finish(self) -> bytes:
        """End of stream: a held-back incomplete character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True).encode()

    def held(self) -> bytes:
        """The 0-3 bytes of a split character held back (what a live upgrade carries)."""
        return self._decoder.getstate()[0]

    def hold(self, carry: bytes) -> None:
        """Start with ``carry`` held back, as ``held`` returned it in another process."""
        self._decoder.setstate((carry, 0))
