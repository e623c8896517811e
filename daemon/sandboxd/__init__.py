"""sandboxd: the in-sandbox command daemon.

Starts commands (in pipes or a PTY), keeps their output in ring buffers keyed by
``command_id`` and streams it to any number of WebSocket clients, which can reattach
from byte offsets without losing or duplicating a byte.
"""

__version__ = "0.1.0"
