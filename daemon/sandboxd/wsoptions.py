"""Whether WebSocket upgrades accept permessage-deflate.

Both SDKs offer permessage-deflate, and hypercorn accepts it whenever offered. Deflating
every output frame costs more CPU than the stream itself on a loopback or in-cluster
link, so sandboxd declines it unless ``--ws-compression`` is set. hypercorn has no option
for this: its handshake builds ``PerMessageDeflate()`` from its module namespace, so that
name is pointed at a variant that accepts no offer. Declining is allowed by RFC 7692
(the response simply carries no ``Sec-WebSocket-Extensions``).
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import ws_stream
from wsproto.extensions import PerMessageDeflate


class _DeclinedDeflate(PerMessageDeflate):
    """permessage-deflate that turns every offer down."""

    def accept(self, offer: Any) -> None:
        return None


def set_compression(enabled: bool) -> None:
    """Accept (True) or decline (False) permessage-deflate on every later upgrade."""
    ws_stream.PerMessageDeflate = PerMessageDeflate if enabled else _DeclinedDeflate  # type: ignore[attr-defined]
