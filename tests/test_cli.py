"""cli.py, the dispatcher: which arguments go to the daemon and which to the client, and
that the client path imports neither the daemon's server stack nor trio."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from sandboxd.cli import client_verb


@pytest.mark.parametrize(
    ("argv", "verb"),
    [
        ([], None),
        (["--listen", "127.0.0.1:0"], None),
        (["serve", "--listen", "x"], None),
        (["--token", "ps"], None),  # a daemon token that happens to read "ps"
        (["--token", "t", "ps"], "ps"),
        (["--url=http://h:1", "exec", "--", "true"], "exec"),
        (["port-forward", "80"], "port-forward"),
    ],
)
def test_a_verb_means_the_client_anything_else_the_daemon(
    argv: list[str], verb: str | None
) -> None:
    assert client_verb(argv) == verb


def test_serve_runs_the_daemon() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "serve", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc.stderr:
        assert json.loads(proc.stderr.readline())["msg"] == "listening"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_the_client_path_imports_no_hypercorn_psutil_or_trio() -> None:
    probe = (
        "import sys\n"
        "from sandboxd import cli\n"
        "from sandboxd.client import main, connection, interactive, watching, copy, http\n"
        "main.build_parser().parse_args(['exec', '--', 'true'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('hypercorn', 'psutil', 'trio', 'wsproto', 'h11', 'msgspec'))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""
