"""One authentication layer for every route and upgrade (design.md, "Security defaults").

* With a token configured, every request but ``GET /healthz`` must carry it in
  ``X-Api-Key`` or ``Authorization: Bearer``; it is compared in constant time, and a
  refusal (401) happens before anything else is done.
* A peer address that keeps failing is told to back off: after ``MAX_FAILURES`` failures
  within ``FAILURE_WINDOW`` seconds, its requests *without a valid token* get 429 with
  ``Retry-After`` until the window passes. A request with the valid token is always
  served, so a misconfigured client (or anyone who can reach the port) cannot lock out
  the others behind the same proxy address. The budget is no bound on online guessing:
  a guess is still told whether it was right (served) or not (401/429), so the token's
  own strength is what stops guessing (the comparison is constant-time).
* A WebSocket upgrade whose ``Origin`` is present must match an allowed origin exactly
  (``trusted.example.com.evil.com`` is not ``trusted.example.com``): browsers attach
  Origin, the SDKs do not, so this stops cross-site WebSocket hijacking. The daemon's own
  origin (``scheme://Host`` of the request: the browser terminal's page) is allowed too,
  but without a token only when Host is an IP address or ``localhost``: a DNS-rebinding
  page is same-origin with itself, yet its Host is the attacker's name.
* Browsers cannot set headers on a WebSocket, so an upgrade may also carry the token as
  the subprotocol ``sandboxd.token.<base64url of the token>`` next to ``sandboxd.v1``,
  which is the one the server echoes (``SUBPROTOCOL``); the token is never echoed.

The token is never logged and never reaches a command's environment.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: Routes that carry no data: the health probe and the browser terminal's static files.
PUBLIC_PATHS = frozenset({"/healthz", "/"})
PUBLIC_PREFIXES = ("/static/",)
#: The subprotocol a browser offers, and the server echoes, on ``/execute/ws``.
SUBPROTOCOL = "sandboxd.v1"
#: Prefix of the subprotocol that carries the token (base64url, unpadded).
TOKEN_SUBPROTOCOL = "sandboxd.token."
MAX_FAILURES = 10
FAILURE_WINDOW = 60.0
TRACKED_PEERS = 10_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a check: allowed, or the status and error to answer with."""

    allowed: bool
    status: int = 200
    error_type: str = ""
    message: str = ""
    retry_after: int | None = None


ALLOWED = Verdict(True)


class Gate:
    """Checks requests against the token, the failure budget and the Origin allowlist."""

    def __init__(self, token: str, allowed_origins: str) -> None:
        self._token = token.encode()
        self._origins = frozenset(o.strip() for o in allowed_origins.split(",") if o.strip())
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def check(
        self,
        path: str,
        header: Callable[[str], str | None],
        peer: str,
        now: float,
        upgrade: bool,
        tls: bool = False,
    ) -> Verdict:
        """Whether a request may proceed. ``header(name)`` looks a request header up;
        ``tls`` says whether the request came over https/wss (its own origin's scheme)."""
        origin = header("origin") if upgrade else None
        if (
            origin is not None
            and origin not in self._origins
            and not self._same_origin(origin, header("host"), tls)
        ):
            return Verdict(
                False, 403, "PermissionDenied", "WebSocket upgrades from this Origin are refused"
            )
        if not self._token or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return ALLOWED
        # The token is compared first, always: a valid token is served however many
        # failures its address had (every client behind a proxy shares one address).
        # What a wrong token is told depends only on the failure count, never on it.
        if self._presented_token_matches(header, upgrade):
            return ALLOWED
        started, count = self._failures.get(peer, (now, 0))
        if now - started >= FAILURE_WINDOW:
            started, count = now, 0
        if count >= MAX_FAILURES:
            retry = max(1, int(started + FAILURE_WINDOW - now + 0.999))
            return Verdict(False, 429, "TooManyRequests", "too many failed authentications", retry)
        self._failures[peer] = (started, count + 1)
        self._failures.move_to_end(peer)
        while len(self._failures) > TRACKED_PEERS:
            self._failures.popitem(last=False)
        return Verdict(
            False,
            401,
            "Unauthorized",
            "a valid token is required in X-Api-Key or Authorization: Bearer",
        )

    def _same_origin(self, origin: str, host: str | None, tls: bool) -> bool:
        if host is None or origin != f"{'https' if tls else 'http'}://{host}":
            return False
        return bool(self._token) or _names_this_machine(host)

    def _presented_token_matches(self, header: Callable[[str], str | None], upgrade: bool) -> bool:
        candidates = []
        api_key = header("x-api-key")
        if api_key is not None:
            candidates.append(api_key.encode())
        authorization = header("authorization") or ""
        if authorization[:7].lower() == "bearer ":
            candidates.append(authorization[7:].strip().encode())
        if upgrade:
            for offered in (header("sec-websocket-protocol") or "").split(","):
                offered = offered.strip()
                if offered.startswith(TOKEN_SUBPROTOCOL):
                    candidates.append(_unbase64url(offered[len(TOKEN_SUBPROTOCOL) :]))
        ok = False
        for candidate in candidates:
            # compare_digest takes constant time for equal lengths and does not reveal
            # the token's length through early exits.
            ok |= hmac.compare_digest(candidate, self._token)
        return ok


def _unbase64url(text: str) -> bytes:
    """Decode unpadded base64url; anything undecodable becomes b"" (which never matches)."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""


def _names_this_machine(host: str) -> bool:
    """Whether a Host header names an IP address or localhost, never a DNS name."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
