"""hypercorn's WebSocket layer, adjusted in two places it has no option for.

**permessage-deflate.**
Both SDKs offer permessage-deflate, and hypercorn accepts it whenever offered. Deflating
every output frame costs more CPU than the stream itself on a loopback or in-cluster
link, so sandboxd declines it unless ``--ws-compression`` is set. hypercorn has no option
for this: its handshake builds ``PerMessageDeflate()`` from its module namespace, so that
name is pointed at a variant that accepts no offer. Declining is allowed by RFC 7692
(the response simply carries no ``Sec-WebSocket-Extensions``).

**The message buffer after an overflow.** When a message grows past the limit, hypercorn
sends close 1009 but keeps the partial message and goes on parsing what the client sends
until it closes; a binary message after an oversized text one was then written into the
text buffer and raised ``TypeError`` out of the connection (found by the fuzzer). The
buffer here stays over the limit once it has been: every later message is refused the
same way, and hypercorn's second close is a no-op.
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import ws_stream
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer
from wsproto.events import Message
from wsproto.extensions import PerMessageDeflate


class _DeclinedDeflate(PerMessageDeflate):
    """permessage-deflate that turns every offer down."""

    def accept(self, offer: Any) -> None:
        return None


def set_compression(enabled: bool) -> None:
    """Accept (True) or decline (False) permessage-deflate on every later upgrade."""
    ws_stream.PerMessageDeflate = PerMessageDeflate if enabled else _DeclinedDeflate  # type: ignore[attr-defined]


class _StickyOverflowBuffer(WebsocketBuffer):
    """hypercorn's message buffer that, once over its limit, refuses everything after."""

    overflowed = False

    def extend(self, event: Message) -> None:  # type: ignore[type-arg]
        if self.overflowed:
            raise FrameTooLargeError()
        try:
            super().extend(event)
        except FrameTooLargeError:
            self.overflowed = True
            raise


def harden_message_buffer() -> None:
    """Use ``_StickyOverflowBuffer`` for every later WebSocket connection."""
    ws_stream.WebsocketBuffer = _StickyOverflowBuffer  # type: ignore[misc]
