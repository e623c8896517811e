"""The token, the Origin allowlist and the failure budget, on every route and upgrade."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys
from urllib.parse import quote

import pytest
import trio

from sandboxd.endpoints.terminal import PAGE_FILES, VENDOR_FILES
from sandboxd.http.app import WEBSOCKET_PATHS
from sandboxd.http.auth import (
    MAX_FAILURES,
    PUBLIC_PATHS,
    PUBLIC_PREFIXES,
    SUBPROTOCOL,
    TOKEN_SUBPROTOCOL,
    Gate,
)
from tests.helpers import (
    exec_socket,
    http_request,
    multipart,
    open_ws,
    rejection,
    running_daemon,
    spend_auth_budget,
)

TOKEN = "s3cret-t0ken-for-tests"


def test_the_token_is_accepted_from_either_header_and_compared_exactly() -> None:
    gate = Gate(TOKEN, "")
    check = lambda headers: gate.check("/sessions", headers.get, "p", 0.0, upgrade=False)  # noqa: E731
    assert check({"x-api-key": TOKEN}).allowed
    assert check({"authorization": f"Bearer {TOKEN}"}).allowed
    assert check({"authorization": f"bearer {TOKEN}"}).allowed
    assert not check({}).allowed
    assert not check({"x-api-key": TOKEN[:-1] + "X"}).allowed  # same length
    assert not check({"x-api-key": TOKEN + "X"}).allowed  # different length
    assert not check({"authorization": TOKEN}).allowed  # not Bearer
    assert gate.check("/healthz", {}.get, "p", 0.0, upgrade=False).allowed


def test_repeated_failures_from_one_peer_get_429_until_the_window_passes() -> None:
    gate = Gate(TOKEN, "")
    for _ in range(MAX_FAILURES):
        assert gate.check("/sessions", {}.get, "peer", 10.0, upgrade=False).status == 401
    for wrong in ({}, {"x-api-key": "wrong"}, {"x-api-key": TOKEN[:-1] + "X"}):
        # Over budget every wrong token gets the same answer, however close it was.
        limited = gate.check("/sessions", wrong.get, "peer", 20.0, upgrade=False)
        assert (limited.allowed, limited.status, limited.retry_after) == (False, 429, 50)
    assert gate.check("/sessions", {}.get, "other", 20.0, upgrade=False).status == 401
    assert gate.check("/sessions", {}.get, "peer", 70.0, upgrade=False).status == 401


def test_the_valid_token_is_served_however_many_failures_came_from_its_peer() -> None:
    gate = Gate(TOKEN, "")
    for i in range(5 * MAX_FAILURES):
        assert not gate.check("/sessions", {"x-api-key": f"guess{i}"}.get, "p", 1.0, False).allowed
    for headers in ({"x-api-key": TOKEN}, {"authorization": f"Bearer {TOKEN}"}):
        assert gate.check("/sessions", headers.get, "p", 2.0, upgrade=False).allowed
        assert gate.check("/execute/ws", headers.get, "p", 2.0, upgrade=True).allowed
    assert gate.check("/sessions", {}.get, "p", 2.0, upgrade=False).status == 429


def test_origins_must_match_exactly_when_present() -> None:
    gate = Gate("", "https://trusted.example.com")
    up = lambda origin: gate.check("/execute/ws", {"origin": origin}.get, "p", 0.0, upgrade=True)  # noqa: E731
    assert up("https://trusted.example.com").allowed
    assert up("https://trusted.example.com.evil.com").status == 403
    assert up("https://evil.com").status == 403
    assert gate.check("/execute/ws", {}.get, "p", 0.0, upgrade=True).allowed  # SDKs send none


def _token_protocol(token: str) -> str:
    return TOKEN_SUBPROTOCOL + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def test_an_upgrade_may_carry_the_token_as_a_subprotocol_counted_like_any_other() -> None:
    gate = Gate(TOKEN, "")

    def up(protocols: str, peer: str = "p", upgrade: bool = True) -> int:
        headers = {"sec-websocket-protocol": protocols}
        return gate.check("/execute/ws", headers.get, peer, 0.0, upgrade=upgrade).status

    assert up(f"{SUBPROTOCOL}, {_token_protocol(TOKEN)}") == 200
    assert up(f"{_token_protocol(TOKEN)},{SUBPROTOCOL}") == 200  # any order, any spacing
    assert up(_token_protocol("tok en/+?é")) == 401  # another token
    assert (
        Gate("tok en/+?é", "")
        .check(
            "/execute/ws",
            {"sec-websocket-protocol": _token_protocol("tok en/+?é")}.get,
            "p",
            0.0,
            upgrade=True,
        )
        .allowed
    )  # any token survives base64url
    assert up(_token_protocol(TOKEN[:-1] + "X")) == 401
    assert up(TOKEN_SUBPROTOCOL + "%%%not-base64") == 401
    assert up(f"{SUBPROTOCOL}, {TOKEN}") == 401  # the bare token is not the subprotocol
    # Plain HTTP requests authenticate by header only.
    assert up(_token_protocol(TOKEN), peer="http", upgrade=False) == 401
    # Wrong subprotocol tokens spend the same failure budget as wrong headers.
    for _ in range(MAX_FAILURES):
        up(_token_protocol("wrong"), peer="guesser")
    assert up(_token_protocol("wrong"), peer="guesser") == 429
    assert up(_token_protocol(TOKEN), peer="guesser") == 200  # a valid token is always served


def test_the_daemons_own_origin_may_upgrade_but_a_rebinding_page_may_not() -> None:
    def up(gate: Gate, origin: str, host: str, tls: bool = False) -> int:
        headers = {"origin": origin, "host": host, "x-api-key": TOKEN}
        return gate.check("/execute/ws", headers.get, "p", 0.0, upgrade=True, tls=tls).status

    no_token, with_token = Gate("", ""), Gate(TOKEN, "")
    for gate in (no_token, with_token):
        assert up(gate, "http://127.0.0.1:8080", "127.0.0.1:8080") == 200
        assert up(gate, "http://[::1]:8080", "[::1]:8080") == 200
        assert up(gate, "http://localhost:8080", "localhost:8080") == 200
        assert up(gate, "https://127.0.0.1:8443", "127.0.0.1:8443", tls=True) == 200
        assert up(gate, "http://127.0.0.1:8443", "127.0.0.1:8443", tls=True) == 403  # scheme
        assert up(gate, "http://127.0.0.1:8081", "127.0.0.1:8080") == 403  # port
        assert up(gate, "http://evil.example", "127.0.0.1:8080") == 403
    # A DNS-rebinding page is same-origin with itself, but its Host is its own name:
    # refused without a token; with a token the token still has to be presented.
    assert up(no_token, "http://rebind.example:8080", "rebind.example:8080") == 403
    assert up(with_token, "https://sandbox.example", "sandbox.example", tls=True) == 200


async def test_the_subprotocol_is_echoed_only_to_a_client_that_offers_it() -> None:
    async with running_daemon(token=TOKEN) as daemon:
        with trio.fail_after(20):
            async with open_ws(daemon.ws, subprotocols=[SUBPROTOCOL, _token_protocol(TOKEN)]) as (
                browser,
                _,
            ):
                await browser.send_message(json.dumps({"type": "execute", "command": "true"}))
                assert json.loads(await browser.get_message())["type"] == "started"
                offered = browser.subprotocol
            async with open_ws(daemon.ws, [("x-api-key", TOKEN)]) as (sdk, _):
                plain = sdk.subprotocol
            wrong = await rejection(daemon.ws, subprotocols=[SUBPROTOCOL, _token_protocol("x")])
            foreign = await rejection(
                daemon.ws,
                [("Origin", "http://evil.example")],
                subprotocols=[SUBPROTOCOL, _token_protocol(TOKEN)],
            )
            own = f"http://{daemon.running.address}"
            async with open_ws(
                daemon.ws, [("Origin", own)], [SUBPROTOCOL, _token_protocol(TOKEN)]
            ) as (same_origin, _):
                await same_origin.send_message(json.dumps({"type": "execute", "command": "true"}))
                assert json.loads(await same_origin.get_message())["type"] == "started"
    assert offered == SUBPROTOCOL  # never the token itself
    assert plain is None
    assert wrong.status_code == 401
    assert foreign.status_code == 403


async def test_every_route_and_upgrade_refuses_without_the_token_before_acting(
    tmp_path: pathlib.Path,
) -> None:
    target = tmp_path / "must-not-exist.txt"
    async with running_daemon(token=TOKEN) as daemon:
        address = daemon.running.address
        routes = daemon.running.app.http_routes
        with trio.fail_after(30):
            for path, methods in routes.items():
                for method in methods:
                    for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": TOKEN + "x"}):
                        body, extra = multipart(b"data")
                        response = await http_request(
                            address,
                            method,
                            f"{path}?path={quote(str(target), safe='')}",
                            body,
                            {**extra, **headers},
                        )
                        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
                            assert response.status in (200, 405), (method, path)
                            continue
                        assert response.status in (401, 429), (method, path, response.status)
                        if response.status == 401 and method != "HEAD":
                            detail = response.json()["detail"]
                            assert detail["error"] == "Unauthorized"
            for ws_path in WEBSOCKET_PATHS:
                refused = await rejection(daemon.ws.replace("/execute/ws", ws_path))
                assert refused.status_code in (401, 429)
            assert not target.exists()
            assert daemon.running.supervisor.sessions == {}
    # The routes open to all, listed: the health probe and the browser terminal's files.
    public = {p for p in routes if p in PUBLIC_PATHS or p.startswith(PUBLIC_PREFIXES)}
    assert public == {"/healthz", "/", *(f"/static/{n}" for n in PAGE_FILES)} | {
        f"/static/vendor/{n}" for n in VENDOR_FILES
    }


async def test_the_right_token_opens_every_door() -> None:
    async with running_daemon(token=TOKEN) as daemon:
        with trio.fail_after(10):
            ok = await http_request(
                daemon.running.address, "GET", "/sessions", headers={"x-api-key": TOKEN}
            )
            bearer = await http_request(
                daemon.running.address,
                "GET",
                "/sessions",
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            async with open_ws(daemon.ws, [("x-api-key", TOKEN)]) as (ws, _):
                await ws.send_message(json.dumps({"type": "execute", "command": "echo in"}))
                assert json.loads(await ws.get_message())["type"] == "started"
    assert ok.status == bearer.status == 200


async def test_a_valid_token_is_served_on_every_route_after_50_failures_from_its_address(
    tmp_path: pathlib.Path,
) -> None:
    async with running_daemon(token=TOKEN) as daemon:
        address = daemon.running.address
        with trio.fail_after(60):
            await spend_auth_budget(address, TOKEN)
            for ws_path in WEBSOCKET_PATHS:
                url = daemon.ws.replace("/execute/ws", ws_path)
                async with open_ws(url, [("x-api-key", TOKEN)]):
                    pass
            async with open_ws(daemon.ws, [("x-api-key", TOKEN)]) as (ws, _):
                await ws.send_message(json.dumps({"type": "execute", "command": "echo in"}))
                assert json.loads(await ws.get_message())["type"] == "started"
            for path, methods in daemon.running.app.http_routes.items():
                for method in methods:
                    body, extra = multipart(b"data")
                    response = await http_request(
                        address,
                        method,
                        f"{path}?path={quote(str(tmp_path / 'f.txt'), safe='')}",
                        body,
                        {**extra, "authorization": f"Bearer {TOKEN}"},
                    )
                    assert response.status not in (401, 429), (method, path, response.status)
            # The budget is still spent: a wrong token is still refused.
            refused = await http_request(address, "GET", "/sessions", headers={"x-api-key": "x"})
            assert refused.status == 429 and "retry-after" in refused.headers
            rejected = await rejection(daemon.ws, [("x-api-key", TOKEN + "x")])
            assert rejected.status_code == 429


async def test_a_foreign_origin_cannot_open_a_websocket() -> None:
    async with running_daemon(allowed_origins="https://trusted.example.com") as daemon:
        with trio.fail_after(10):
            refused = await rejection(
                daemon.ws, [("Origin", "https://trusted.example.com.evil.com")]
            )
            async with open_ws(daemon.ws, [("Origin", "https://trusted.example.com")]):
                pass
            async with exec_socket(daemon.ws) as client:  # no Origin: an SDK
                await client.start(command="true")
    assert refused.status_code == 403


def test_the_token_stays_out_of_cmdline_logs_and_commands() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "--listen", "127.0.0.1:0", "--token", TOKEN],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc.stderr:
        address = json.loads(proc.stderr.readline())["address"]
        with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
            assert TOKEN.encode() not in cmdline.read()

        async def probe() -> str:
            await http_request(
                address, "GET", f"/sessions?token={TOKEN}", headers={"x-api-key": TOKEN + "x"}
            )
            await http_request(address, "GET", f"/nope?token={TOKEN}", headers={"x-api-key": TOKEN})
            async with open_ws(f"ws://{address}/execute/ws", [("x-api-key", TOKEN)]) as (ws, _):
                await ws.send_message(
                    json.dumps({"type": "execute", "command": "env; cat /proc/$$/cmdline"})
                )
                seen = ""
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] == "stdout":
                        seen += frame["data"]
                    if frame["type"] == "exit":
                        return seen

        seen = trio.run(probe)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        logs = proc.stderr.read()
    assert TOKEN not in seen and TOKEN not in logs
    assert "SANDBOXD_COMMAND_ID" in seen


@pytest.mark.sdk
def test_the_python_sdk_authenticates_with_its_api_key() -> None:
    os.environ.setdefault("LANGSMITH_SANDBOX_WS_TIMEOUT_CONNECT_BUDGET", "3")  # before import
    from langsmith.sandbox import SandboxConnectionError

    from tests.sdk.conftest import daemon_process, sdk_sandbox

    with daemon_process("--token", TOKEN) as daemon:
        assert sdk_sandbox(daemon.url, TOKEN).run("echo authed", timeout=10).stdout == "authed\n"
        with pytest.raises(SandboxConnectionError):
            sdk_sandbox(daemon.url, "wrong-key").run("echo no", timeout=10)


@pytest.mark.sdk
def test_the_python_sdk_runs_after_50_failed_authentications_from_its_address() -> None:
    from tests.sdk.conftest import daemon_process, sdk_sandbox

    with daemon_process("--token", TOKEN) as daemon:
        trio.run(spend_auth_budget, daemon.address, TOKEN)
        result = sdk_sandbox(daemon.url, TOKEN).run("echo authed; echo e >&2; exit 3", timeout=10)
        assert (result.stdout, result.stderr, result.exit_code) == ("authed\n", "e\n", 3)
