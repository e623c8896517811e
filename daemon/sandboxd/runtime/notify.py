"""systemd integration without libsystemd: readiness notifications and socket activation.

* ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) receives
  ``READY=1`` once the port accepts, ``STATUS=...`` lines, ``WATCHDOG=1`` every half of
  ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset or names this process) and
  ``STOPPING=1`` when a stop begins.
* ``$LISTEN_FDS``/``$LISTEN_PID`` (socket activation): the listening socket is fd 3.

These variables never reach commands (``environment.clean_environment``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger("sandboxd.notify")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; does nothing when there is no ``$NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        target = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if target.startswith("@"):
            self._address = b"\0" + target[1:].encode()
        elif target.startswith("/"):
            self._address = target
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> None:
        """One datagram of ``KEY=value`` lines; failures are logged, never raised."""
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify failed", extra={"error": str(exc)})

    async def keep_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` at half the watchdog interval, for the daemon's life."""
        if self.watchdog_interval is None or not self.enabled:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)


def activated_socket(environ: Mapping[str, str]) -> socket.socket | None:
    """The listening socket systemd passed (fd 3), or None without socket activation."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = environ.get("LISTEN_FDS", "")
    if not count.isdigit() or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.set_inheritable(False)
    for extra in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(extra, False)  # only the first is used; none reach commands
    return sock
