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
  Origin, the SDKs do not, so this stops cross-site WebSocket hijacking.

The token is never logged and never reaches a command's environment.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

PUBLIC_PATHS = frozenset({"/healthz"})
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
    ) -> Verdict:
        """Whether a request may proceed. ``header(name)`` looks a request header up."""
        origin = header("origin") if upgrade else None
        if origin is not None and origin not in self._origins:
            return Verdict(
                False, 403, "PermissionDenied", "WebSocket upgrades from this Origin are refused"
            )
        if not self._token or path in PUBLIC_PATHS:
            return ALLOWED
        # The token is compared first, always: a valid token is served however many
        # failures its address had (every client behind a proxy shares one address).
        # What a wrong token is told depends only on the failure count, never on it.
        if self._presented_token_matches(header):
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

    def _presented_token_matches(self, header: Callable[[str], str | None]) -> bool:
        candidates = []
        api_key = header("x-api-key")
        if api_key is not None:
            candidates.append(api_key)
        authorization = header("authorization") or ""
        if authorization[:7].lower() == "bearer ":
            candidates.append(authorization[7:].strip())
        ok = False
        for candidate in candidates:
            # compare_digest takes constant time for equal lengths and does not reveal
            # the token's length through early exits.
            ok |= hmac.compare_digest(candidate.encode(), self._token)
        return ok
