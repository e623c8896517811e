"""``GET /`` and ``GET /static/<file>``: the browser terminal's page and its files.

The page itself (``sandboxd/web/``: ``index.html``, ``app.js``, ``app.css``) is written by
hand; xterm.js and its add-ons come from the npm registry at build time (``make web``
copies them into ``sandboxd/web/vendor/``, which is not committed). A daemon installed
without them answers ``/`` with a page that says how to add them, never a broken terminal.

The files carry no data (everything goes through ``GET /sessions`` and ``/execute/ws``
with the token), so they are public routes (``auth.PUBLIC_PATHS``). Every response carries
a strict Content-Security-Policy: scripts and styles only from the daemon itself, no
inline script, no eval, no framing. Only the files listed here are served: a request path
is looked up in a table, never joined onto a directory.
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
from dataclasses import dataclass, field

from sandboxd.http.asgi import Receive, Scope, Send, header, respond

#: The folder that holds the page, inside the installed package.
WEB_DIR = pathlib.Path(__file__).resolve().parent.parent / "web"

#: The page's own files, served at ``/static/<name>``.
PAGE_FILES = ("app.js", "api.js", "viewer.js", "app.css")
#: The npm files ``make web`` copies into ``web/vendor/``, served at ``/static/vendor/<name>``.
VENDOR_FILES = (
    "xterm.mjs",
    "xterm.css",
    "addon-fit.mjs",
    "addon-search.mjs",
    "addon-web-links.mjs",
    "addon-webgl.mjs",
)

#: Scripts only from the daemon (no inline script, no eval). Styles may be inline because
#: xterm.js 6 writes its viewport and DOM-renderer rules into ``<style>`` elements
#: (xterm.js#5805, which would have removed them, was closed unmerged); a style cannot
#: run code, and nothing may be loaded from anywhere but the daemon.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("cache-control", "no-cache"),
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

MISSING_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sandboxd: terminal files missing</title>
</head><body>
<h1>The browser terminal's files are not installed</h1>
<p>This sandboxd was built without the xterm.js files the terminal page needs (they come
from the npm registry at build time and are not in the source tree).</p>
<p>From a source checkout, run <code>make web</code> (it needs <code>npm</code>), then restart
sandboxd, or build the wheel or the single-file build after it (<code>make dist</code> does
both). Everything else in sandboxd works without them.</p>
</body></html>
"""


@dataclass
class Asset:
    """One servable file, read once."""

    body: bytes
    content_type: str
    etag: str
    _gzipped: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(cls, body: bytes, name: str) -> Asset:
        digest = hashlib.sha256(body).hexdigest()[:32]
        return cls(body, _TYPES[pathlib.PurePath(name).suffix], f'"{digest}"')

    def gzipped(self) -> bytes:
        """The body gzip-compressed (computed on first use)."""
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.body, compresslevel=6, mtime=0)
        return self._gzipped


def load_assets(root: pathlib.Path | None = None) -> dict[str, Asset]:
    """The routes and files of the terminal (from ``WEB_DIR`` unless ``root`` is given);
    ``/`` is the missing-files page when any vendored file is absent (and the page's
    scripts are then not served at all)."""
    root = WEB_DIR if root is None else root
    vendor = root / "vendor"
    complete = all((vendor / name).is_file() for name in VENDOR_FILES)
    if not complete or not (root / "index.html").is_file():
        return {"/": Asset.of(MISSING_PAGE, "index.html")}
    assets = {"/": Asset.of((root / "index.html").read_bytes(), "index.html")}
    for name in PAGE_FILES:
        assets[f"/static/{name}"] = Asset.of((root / name).read_bytes(), name)
    for name in VENDOR_FILES:
        assets[f"/static/vendor/{name}"] = Asset.of((vendor / name).read_bytes(), name)
    return assets


class TerminalFiles:
    """Serves the terminal's files from memory."""

    def __init__(self, root: pathlib.Path | None = None) -> None:
        self.assets = load_assets(root)

    @property
    def installed(self) -> bool:
        """Whether the vendored xterm.js files were found."""
        return "/static/app.js" in self.assets

    def find(self, path: str) -> Asset | None:
        """The file at a request path, or None."""
        return self.assets.get(path)

    async def serve(self, asset: Asset, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer GET/HEAD for ``asset``: 304 on a matching ETag, gzip when accepted."""
        headers = [*SECURITY_HEADERS, ("etag", asset.etag), ("vary", "accept-encoding")]
        head = scope["method"] == "HEAD"
        if header(scope, "if-none-match") == asset.etag:
            await respond(send, 304, content_type=None, headers=headers, content_length=0)
            return
        body = asset.body
        if "gzip" in (header(scope, "accept-encoding") or "").lower():
            body = asset.gzipped()
            headers.append(("content-encoding", "gzip"))
        await respond(
            send,
            200,
            body,
            content_type=asset.content_type,
            headers=headers,
            send_body=not head,
        )
