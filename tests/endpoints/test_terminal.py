"""``GET /`` and ``/static/``: the browser terminal's files, their headers, and the page a
daemon built without the vendored xterm.js files serves instead. (The page in a real
browser: ``test_terminal_browser.py``.)"""

from __future__ import annotations

import gzip
import pathlib
import re

import pytest
import trio

from sandboxd.endpoints import terminal
from sandboxd.endpoints.terminal import (
    CONTENT_SECURITY_POLICY,
    PAGE_FILES,
    VENDOR_FILES,
    load_assets,
)
from tests.helpers import http_request, running_daemon

TOKEN = "terminal-test-token"


def test_the_checkout_has_the_vendored_files() -> None:
    """The other tests need them; ``make web`` (run by ``make test``) puts them there."""
    missing = [n for n in VENDOR_FILES if not (terminal.WEB_DIR / "vendor" / n).is_file()]
    assert not missing, f"run `make web` first; missing {missing}"


async def test_the_page_and_its_files_come_with_a_strict_policy() -> None:
    async with running_daemon() as daemon:
        address = daemon.running.address
        with trio.fail_after(20):
            page = await http_request(address, "GET", "/")
            script = await http_request(address, "GET", "/static/app.js")
            module = await http_request(address, "GET", "/static/vendor/xterm.mjs")
            style = await http_request(address, "GET", "/static/app.css")
            head = await http_request(address, "HEAD", "/static/vendor/xterm.mjs")
            again = await http_request(
                address, "GET", "/static/app.js", headers={"if-none-match": script.headers["etag"]}
            )
            zipped = await http_request(
                address, "GET", "/static/vendor/xterm.mjs", headers={"accept-encoding": "gzip"}
            )
            posted = await http_request(address, "POST", "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="static/app.js">' in page.body
    assert b"<script>" not in page.body  # no inline script
    assert not re.search(rb"\son[a-z]+\s*=", page.body)  # no inline event handlers
    for response in (page, script, module, style):
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert script.headers["content-type"] == module.headers["content-type"]
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert module.body.rstrip().endswith(b"export{Dl as Terminal};")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(module.body))
    assert again.status == 304 and again.body == b""
    assert zipped.headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped.body) == module.body
    assert posted.status == 405


async def test_the_files_need_no_token_and_lead_to_no_data() -> None:
    async with running_daemon(token=TOKEN) as daemon:
        address = daemon.running.address
        with trio.fail_after(20):
            page = await http_request(address, "GET", "/")
            script = await http_request(address, "GET", "/static/app.js")
            data = await http_request(address, "GET", "/sessions")
            climb = await http_request(address, "GET", "/static/../sessions")
            unknown = await http_request(address, "GET", "/static/vendor/LICENSE.xterm")
            source = await http_request(address, "GET", "/static/../endpoints/terminal.py")
    assert (page.status, script.status) == (200, 200)
    assert data.status == 401
    # A public prefix never becomes a file path: only the listed files exist.
    assert climb.status == unknown.status == source.status == 404
    assert b"sessions" not in climb.body.replace(b"/static/../sessions", b"")


async def test_without_the_vendored_files_the_page_says_how_to_add_them(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("index.html", *PAGE_FILES):
        (tmp_path / name).write_bytes((terminal.WEB_DIR / name).read_bytes())
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "xterm.mjs").write_text("// only one of them")
    assert set(load_assets(tmp_path)) == {"/"}
    monkeypatch.setattr(terminal, "WEB_DIR", tmp_path)
    async with running_daemon() as daemon:
        address = daemon.running.address
        assert not daemon.running.app.terminal.installed
        with trio.fail_after(20):
            page = await http_request(address, "GET", "/")
            script = await http_request(address, "GET", "/static/app.js")
            vendored = await http_request(address, "GET", "/static/vendor/xterm.mjs")
            health = await http_request(address, "GET", "/healthz")
    assert page.status == 200
    assert b"make web" in page.body and b"<script" not in page.body
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert script.status == vendored.status == 404
    assert health.status == 200
