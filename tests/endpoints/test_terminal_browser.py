"""The browser terminal in a real browser: Playwright (sync API) driving Debian's
``/usr/bin/chromium`` (``make tools`` installs it; ``playwright install`` is never run)
against a daemon started as a subprocess with a token.

Plain (non-trio) tests. Each is bounded twice: every wait below has its own deadline,
and an alarm fails a test that hangs anyway. Sockets are cut with a small TCP proxy the
page is loaded through, so the browser sees the connection die as it would on a network.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import pathlib
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from playwright.sync_api import sync_playwright

from sandboxd.endpoints.terminal import WEB_DIR
from tests.sdk.conftest import DaemonProcess, daemon_process

CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test token/+=?"
TEST_SECONDS = 120
TOKEN_PROTOCOL = "sandboxd.token." + base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
#: Collects what the page must never produce (CSP violations, uncaught errors).
WATCH_PAGE = """
window.__problems = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__problems.push('csp ' + e.violatedDirective + ' ' + e.blockedURI));
"""


# ---- the daemon, a cuttable proxy in front of it, the browser ---------------------------


class Proxy:
    """A TCP proxy on 127.0.0.1 whose ``cut()`` drops every connection through it."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source)
            self._drop(sink)

    def _drop(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.discard(sock)
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> None:
        """Drop every connection now open (new ones still go through)."""
        with self.lock:
            victims = list(self.open)
        for sock in victims:
            self._drop(sock)
        self.cuts += 1

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with daemon_process("--token", TOKEN) as running:
        yield running
    assert not [e for e in running.logs if TOKEN in json.dumps(e)], "the token reached the log"


def refusals_logged(daemon: DaemonProcess, status: int) -> int:
    return len([e for e in list(daemon.logs) if e.get("status") == status])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert os.access(CHROMIUM, os.X_OK), "install Debian's chromium (apt-get install chromium)"
    assert (WEB_DIR / "vendor" / "xterm.mjs").is_file(), "run `make web` first"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def proxy(daemon: DaemonProcess) -> Iterator[Proxy]:
    through = Proxy(daemon.address)
    yield through
    through.close()


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"browser test still running after {TEST_SECONDS} s")


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TEST_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Page:
    """One browser tab on the terminal, with what it logged."""

    page: Any
    errors: list[str]

    def js(self, expression: str, arg: Any = None) -> Any:
        """Evaluate a function expression in the page (CDP, so the page's CSP allows it)."""
        return self.page.evaluate(expression, arg)

    def text(self) -> str:
        return str(self.js("() => window.__sandboxd.text()"))

    def wait(self, predicate: Callable[[], Any], what: str, seconds: float = 20) -> Any:
        """Poll until ``predicate()`` is truthy; fails with the screen when it never is."""
        deadline = time.monotonic() + seconds
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}; the screen shows:\n{self.text()}")
            time.sleep(0.05)

    def wait_text(self, pattern: str, seconds: float = 20) -> str:
        return str(
            self.wait(
                lambda: re.search(pattern, self.text(), re.M) and self.text(), pattern, seconds
            )
        )

    def ready(self) -> None:
        self.wait(
            lambda: self.js("() => !!(window.__sandboxd && window.__sandboxd.ready)"), "the page"
        )

    def attached(self) -> None:
        self.wait(lambda: self.js("() => window.__sandboxd.attached()"), "an attached socket")

    def new_shell(self) -> str:
        self.page.click("#new-shell")
        self.attached()
        # The prompt, so typing lands in the shell, not in bash's start-up.
        self.wait_text(r"[$#] $")
        return str(self.js("() => window.__sandboxd.view().id"))

    def type(self, text: str) -> None:
        self.page.keyboard.type(text)

    def clean(self) -> None:
        problems = self.js("() => window.__problems") or []
        assert not problems and not self.errors, (problems, self.errors)


@contextmanager
def open_page(
    browser: Any, base: str, token: str | None = TOKEN, width: int = 1100, height: int = 650
) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": width, "height": height})
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(f"pageerror {error}"))
        page.on("console", lambda m: m.type == "error" and errors.append(f"console {m.text}"))
        page.add_init_script(WATCH_PAGE)
        fragment = f"#token={quote(token)}" if token is not None else ""
        page.goto(f"{base}/{fragment}")
        yield Page(page, errors)
    finally:
        context.close()


def shown_lines(text: str, prefix: str) -> list[int]:
    return [int(m) for m in re.findall(rf"^{prefix}(\d+)$", text, re.M)]


def start_session(daemon: DaemonProcess, command: str, pty: bool = True) -> str:
    """Start a command from outside the page (as an SDK would); its command_id."""
    from websockets.sync.client import connect

    command_id = f"t-{uuid.uuid4().hex[:12]}"
    with connect(
        f"ws://{daemon.address}/execute/ws", additional_headers={"x-api-key": TOKEN}
    ) as ws:
        frame = {"type": "execute", "command": command, "command_id": command_id, "pty": pty}
        ws.send(json.dumps({**frame, "timeout_seconds": 0, "idle_timeout_seconds": 600}))
        assert json.loads(ws.recv(timeout=20))["type"] == "started"
    return command_id


# ---- the tests ------------------------------------------------------------------------------


def test_a_typed_command_shows_its_output_on_a_clean_page(
    browser: Any, daemon: DaemonProcess
) -> None:
    with open_page(browser, daemon.url) as tab:
        tab.ready()
        assert "token" not in tab.page.url  # the fragment leaves the address bar
        tab.new_shell()
        tab.type("echo answer-$((6*7))\n")
        tab.wait_text(r"^answer-42$")
        tab.type("exit 3\n")
        tab.wait_text(r"^\[exited 3\]$")
        assert tab.js("() => document.getElementById('typing').disabled")
        assert tab.js("() => window.__sandboxd.stats.overlaps") == 0
        tab.clean()


def test_without_webgl_the_dom_renderer_draws_the_terminal(
    browser: Any, daemon: DaemonProcess
) -> None:
    context = browser.new_context()
    context.add_init_script(
        "HTMLCanvasElement.prototype.getContext = function () { return null; };"
    )
    try:
        page = context.new_page()
        page.goto(f"{daemon.url}/#token={quote(TOKEN)}")
        tab = Page(page, [])
        tab.ready()
        assert tab.js("() => window.__sandboxd.renderer()") == "dom"
        tab.new_shell()
        tab.type("echo dom-$((2+3))\n")
        tab.wait_text(r"^dom-5$")
        assert page.locator("#terminal .xterm-rows").inner_text().count("dom-5") >= 1
    finally:
        context.close()


def test_the_window_size_follows_the_viewport(browser: Any, daemon: DaemonProcess) -> None:
    with open_page(browser, daemon.url, width=1200, height=700) as tab:
        tab.ready()
        tab.new_shell()
        sizes = []
        for width, height in ((1200, 700), (760, 420)):
            tab.page.set_viewport_size({"width": width, "height": height})
            cols, rows = tab.wait(
                lambda: tab.js("() => [window.__sandboxd.term.cols, window.__sandboxd.term.rows]"),
                "the terminal's size",
            )
            time.sleep(0.5)  # the fit and the debounced resize frame
            cols, rows = tab.js("() => [window.__sandboxd.term.cols, window.__sandboxd.term.rows]")
            marker = f"size{width}"
            tab.type(f"echo {marker} $(stty size)\n")
            tab.wait_text(rf"^{marker} {rows} {cols}$")
            sizes.append((cols, rows))
        assert sizes[0][0] > sizes[1][0] and sizes[0][1] > sizes[1][1], sizes


# A command that prints L1..L1500 over five seconds or more, then DONE.
STREAM = (
    'for i in $(seq 1 1500); do echo L$i; [ $((i % 30)) = 0 ] && sleep 0.1; done; echo DO""NE\n'
)


def assert_every_line_once(text: str) -> None:
    assert shown_lines(text, "L") == list(range(1, 1501))
    assert len(re.findall(r"^DONE$", text, re.M)) == 1


def test_a_cut_socket_resumes_with_no_line_missing_or_twice(browser: Any, proxy: Proxy) -> None:
    with open_page(browser, f"http://{proxy.address}") as tab:
        tab.ready()
        tab.new_shell()
        tab.type(STREAM)
        tab.wait(lambda: len(shown_lines(tab.text(), "L")) >= 200, "L200")
        proxy.cut()  # the network drops: the browser sees 1006
        tab.wait(lambda: len(shown_lines(tab.text(), "L")) >= 700, "L700 after the cut")
        tab.js("() => window.__sandboxd.ws().close(4000)")  # the page's own socket closes
        tab.wait(lambda: tab.js("() => window.__sandboxd.stats.connects") >= 3, "a reconnect")
        text = tab.wait_text(r"^DONE$", seconds=40)
        assert_every_line_once(text)
        stats = tab.js("() => window.__sandboxd.stats")
        assert stats["overlaps"] == stats["gaps"] == 0
        assert stats["connects"] >= 3, stats
        tab.clean()


def test_a_reload_mid_stream_resumes_with_no_line_missing_or_twice(
    browser: Any, daemon: DaemonProcess
) -> None:
    with open_page(browser, daemon.url) as tab:
        tab.ready()
        command_id = tab.new_shell()
        tab.type(STREAM)
        tab.wait(lambda: len(shown_lines(tab.text(), "L")) >= 300, "L300")
        tab.page.reload()
        tab.ready()
        assert tab.js("() => window.__sandboxd.view().id") == command_id
        text = tab.wait_text(r"^DONE$", seconds=40)
        assert_every_line_once(text)
        assert tab.js("() => window.__sandboxd.stats.overlaps") == 0
        # And typing still works after the reload (the page was writing before it).
        tab.type("echo after-reload\n")
        tab.wait_text(r"^after-reload$")


def test_an_attached_session_is_read_only_at_the_daemon(
    browser: Any, daemon: DaemonProcess, tmp_path: pathlib.Path
) -> None:
    command_id = start_session(daemon, "exec bash --norc -i")
    victim = tmp_path / "must-not-exist"
    with open_page(browser, daemon.url) as tab:
        tab.ready()
        tab.page.click(f"#sessions tr[data-id='{command_id}']")
        tab.attached()
        assert not tab.js("() => document.getElementById('typing').checked")
        tab.page.click("#terminal")
        tab.type(f"touch {victim}\n")  # the page sends nothing while read-only...
        assert "read-only" in tab.page.inner_text("#status")
        # ...and the daemon refuses what the page's watching socket sends anyway.
        tab.js(
            "(line) => window.__sandboxd.ws().send(JSON.stringify({type: 'input', data: line}))",
            f"touch {victim}\r",
        )
        refusals = tab.wait(lambda: tab.js("() => window.__sandboxd.stats.refusals"), "a refusal")
        assert refusals[0]["error_type"] == "InvalidRequest"
        assert refusals[0]["error"].startswith("read-only attachment")
        assert tab.js("() => window.__sandboxd.ws().readyState") == 1  # still attached
        # Typing on: the same socket's successor writes; input sent in order after the
        # refused one runs, so had the refused one run, the file would exist by now.
        # Keys typed in the same instant as the toggle wait for the new socket.
        tab.js(
            """() => {
                 document.getElementById('typing').click();
                 window.__sandboxd.term.input('echo typed-$((40+2))\\r');
               }"""
        )
        assert tab.js("() => document.getElementById('typing').checked")
        tab.wait_text(r"^typed-42$")
        assert not victim.exists()
        tab.clean()


def test_a_command_with_markup_is_listed_as_text(browser: Any, daemon: DaemonProcess) -> None:
    command = "echo '<img src=x onerror=window.__pwned=1>'; echo second-line; sleep 30"
    command_id = start_session(daemon, command, pty=False)
    with open_page(browser, daemon.url) as tab:
        tab.ready()
        cell = tab.page.locator(f"#sessions tr[data-id='{command_id}'] td.command")
        cell.wait_for()
        assert cell.inner_text() == command
        assert tab.page.locator("#sessions img").count() == 0
        # Its output, in the terminal: text too, and a pipe's "\n" starts a new line.
        tab.page.click(f"#sessions tr[data-id='{command_id}']")
        tab.wait_text(r"^<img src=x onerror=window.__pwned=1>\nsecond-line$")
        assert tab.js("() => window.__pwned === undefined")
        tab.clean()


def test_a_foreign_origin_cannot_open_the_socket(browser: Any, daemon: DaemonProcess) -> None:
    """A page of another site on this machine (same host, another port: a foreign
    origin), holding the right token, tries the daemon's socket; then the daemon's own
    page runs the same code."""
    try_socket = """([url, protocols]) => new Promise((resolve) => {
        const ws = new WebSocket(url, protocols);
        ws.onopen = () => { resolve('open ' + ws.protocol); ws.close(); };
        ws.onclose = (e) => resolve('closed ' + e.code);
    })"""
    arguments = [f"ws://{daemon.address}/execute/ws", ["sandboxd.v1", TOKEN_PROTOCOL]]
    with foreign_site() as foreign:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(foreign)
            refused = refusals_logged(daemon, 403)
            outcome = page.evaluate(try_socket, arguments)
            page.goto(f"{daemon.url}/#token={quote(TOKEN)}")
            own = page.evaluate(try_socket, arguments)
        finally:
            context.close()
    assert outcome == "closed 1006"
    assert own == "open sandboxd.v1"
    Page(page, []).wait(
        lambda: refusals_logged(daemon, 403) == refused + 1,
        "the daemon's 403",
    )


@contextmanager
def foreign_site() -> Iterator[str]:
    """A web server on another port of this machine: another origin, as the browser sees it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><p>another site"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_wrong_token_gets_a_clear_message_and_the_right_one_gets_in(
    browser: Any, daemon: DaemonProcess
) -> None:
    with open_page(browser, daemon.url, token="not-the-token") as tab:
        tab.ready()
        tab.page.locator("#login").wait_for()
        message = tab.page.inner_text("#login-message")
        assert "token was refused" in message and "401" in message
        assert tab.page.locator("#main").is_hidden()
        tab.page.fill("#login-token", TOKEN)
        tab.page.click("#login button[type=submit]")
        tab.page.locator("#main").wait_for()
        assert tab.page.locator("#login").is_hidden()
        tab.new_shell()
        tab.type("echo in-$((1+1))\n")
        tab.wait_text(r"^in-2$")


def test_screenshot(browser: Any, daemon: DaemonProcess, tmp_path: pathlib.Path) -> None:
    """The page as a person sees it; kept in docs/terminal.png (TERMINAL_SCREENSHOT=path)."""
    start_session(daemon, "python3 -m http.server 8000", pty=False)
    start_session(daemon, "make -C /work build", pty=False)
    with open_page(browser, daemon.url, width=1280, height=720) as tab:
        tab.ready()
        tab.new_shell()
        tab.type(
            "ls --color=always / && echo && printf '\\e[1;32mok\\e[0m https://example.com\\n'\n"
        )
        tab.wait_text(r"^ok https://example.com$")
        tab.page.wait_for_timeout(2500)  # one refresh of the list
        path = pathlib.Path(os.environ.get("TERMINAL_SCREENSHOT", tmp_path / "terminal.png"))
        tab.page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000
