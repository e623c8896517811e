"""The command line: flags, environment twins, help, JSON logs, and a clean Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from sandboxd.cli import build_parser, parse_args
from sandboxd.config import Config


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
