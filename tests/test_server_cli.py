"""The daemon's command line: flags, environment twins, help, JSON logs, and a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from sandboxd.core.config import Config
from sandboxd.server_cli import build_parser, parse_args


def test_defaults_match_the_config_struct() -> None:
    assert parse_args([], {}) == Config()


def test_flags_set_fields_and_beat_their_environment_twins() -> None:
    config = parse_args(
        ["--ring-bytes", "1048576", "--ws-compression", "--listen", "0.0.0.0:9000"],
        {"SANDBOXD_RING_BYTES": "2097152", "SANDBOXD_STALL_SECONDS": "2.5"},
    )
    assert config.ring_bytes == 1048576  # the flag wins
    assert config.stall_seconds == 2.5  # the variable beats the default
    assert config.ws_compression is True
    assert config.listen_host_port() == ("0.0.0.0", 9000)


def test_boolean_twins_accept_the_usual_spellings() -> None:
    assert parse_args([], {"SANDBOXD_WS_COMPRESSION": "yes"}).ws_compression is True
    assert (
        parse_args(["--no-ws-compression"], {"SANDBOXD_WS_COMPRESSION": "1"}).ws_compression
        is False
    )


@pytest.mark.parametrize(
    ("argv", "environ", "complaint"),
    [
        (["--ring-bytes", "12"], {}, "ring_bytes"),
        (["--listen", "nonsense"], {}, "HOST:PORT"),
        ([], {"SANDBOXD_MAX_SESSIONS": "many"}, "max_sessions"),
        ([], {"SANDBOXD_WS_COMPRESSION": "maybe"}, "boolean"),
    ],
)
def test_bad_settings_are_usage_errors_that_say_which(
    argv: list[str], environ: dict[str, str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, environ)
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_every_setting_is_documented_in_help_with_its_variable() -> None:
    text = build_parser().format_help()
    for name in Config.__struct_fields__:
        assert "--" + name.replace("_", "-") in text
        assert "SANDBOXD_" + name.upper() in " ".join(text.split())


def test_the_daemon_logs_json_lines_and_stops_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc.stderr:
        first = json.loads(proc.stderr.readline())
        assert first["msg"] == "listening" and first["level"] == "info"
        assert first["address"].startswith("127.0.0.1:")
        assert first["spawner"] == "sandboxd-spawner"  # (make spawner built it)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = [json.loads(line) for line in proc.stderr.read().splitlines()]
    assert rest[-1]["msg"] == "stopped"
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in rest)


def test_a_port_in_use_is_a_clear_error_and_exit_1() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sandboxd", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    entry = json.loads(done.stderr.strip().splitlines()[-1])
    assert entry["msg"] == "cannot start" and "in use" in entry["error"]


def test_a_client_that_never_reads_cannot_keep_the_daemon_from_stopping() -> None:
    import base64
    import os
    import socket
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "--listen", "127.0.0.1:0", "--stop-grace", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc.stderr, socket.socket() as sock:
        port = int(json.loads(proc.stderr.readline())["address"].rsplit(":", 1)[1])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                "GET /execute/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101")
        payload = json.dumps({"type": "execute", "command": "yes"}).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        time.sleep(1.0)  # the daemon's writes to this socket are now blocked
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - started
        rest = [json.loads(line) for line in proc.stderr.read().splitlines()]
        assert code == 0, rest
    assert took < 20
    assert any(entry["msg"] in ("stopped", "graceful stop overran; exiting now") for entry in rest)


def _lines_until_listening(argv: list[str], environ: dict[str, str]) -> list[dict[str, object]]:
    """The daemon's log lines up to and including "listening"; then it is stopped."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env={**clean, **environ},
    )
    assert proc.stderr is not None
    lines: list[dict[str, object]] = []
    with proc.stderr:
        while not lines or lines[-1]["msg"] != "listening":
            line = proc.stderr.readline()
            assert line, lines  # the daemon ended before listening
            lines.append(json.loads(line))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    return lines


def test_listening_off_loopback_without_a_token_is_warned_about_at_start() -> None:
    bare = _lines_until_listening(["--listen", "0.0.0.0:0"], {})
    with_token = _lines_until_listening(["--listen", "0.0.0.0:0"], {"SANDBOXD_TOKEN": "t0k3n"})
    loopback = _lines_until_listening(["--listen", "127.0.0.1:0"], {})
    warnings = [line for line in bare if line["level"] == "warning"]
    assert [line["msg"] for line in warnings] == [
        "no --token on a non-loopback address: anyone who can reach the port can run "
        "commands as this user"
    ]
    assert warnings[0]["listen"] == "0.0.0.0:0"
    assert [line for line in with_token + loopback if line["level"] == "warning"] == []
