"""The CLI in a real terminal (pexpect): window size and resize, detach and resume,
Ctrl-C with and without ``-t``, and a terminal restored after the daemon dies; plus the
pure parts of terminal.py (detach keys)."""

from __future__ import annotations

import io
import re
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

import pexpect
import pytest

from sandboxd.client.terminal import DetachMatcher, parse_detach_keys
from tests.client.conftest import CLI, cli_env
from tests.sdk.conftest import DaemonProcess, start_daemon

CLI_LINE = " ".join(shlex.quote(part) for part in CLI)


def spawn(url: str, args: str, rows: int = 24, cols: int = 80, **env: str) -> pexpect.spawn:
    """The CLI (``args`` as shell words) on a pseudo-terminal of the given size."""
    child = pexpect.spawn(
        CLI[0],
        [*CLI[1:], *shlex.split(args)],
        env=cli_env(url, **env),
        dimensions=(rows, cols),
        timeout=20,
    )
    child.logfile_read = io.BytesIO()  # everything the terminal showed
    return child


def shown(child: pexpect.spawn) -> bytes:
    log = child.logfile_read
    assert isinstance(log, io.BytesIO)
    return log.getvalue()


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, child.signalstatus
    return int(child.exitstatus)


# ---- pure -----------------------------------------------------------------------------


def test_detach_keys_use_dockers_syntax() -> None:
    assert parse_detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    assert parse_detach_keys("ctrl-a,d") == b"\x01d"
    assert parse_detach_keys("") == b""
    with pytest.raises(ValueError, match="ctrl-1"):
        parse_detach_keys("ctrl-1")


def test_the_matcher_holds_a_prefix_and_releases_it_when_the_sequence_breaks() -> None:
    m = DetachMatcher(b"\x10\x11")
    assert m.feed(b"ab\x10") == (b"ab", False)
    assert m.feed(b"x") == (b"\x10x", False)  # ctrl-p then x: both go out
    assert m.feed(b"\x10\x10") == (b"\x10", False)  # the second may start it again
    assert m.feed(b"\x11rest") == (b"", True)
    assert DetachMatcher(b"").feed(b"\x10\x11") == (b"\x10\x11", False)


# ---- in a terminal --------------------------------------------------------------------


def test_stty_size_matches_the_window_and_follows_a_resize(sandboxd: DaemonProcess) -> None:
    child = spawn(sandboxd.url, "exec -it -- sh -c 'stty size; read x; stty size'", 37, 101)
    child.expect("37 101")
    child.setwinsize(50, 132)  # SIGWINCH to the CLI -> a resize frame
    time.sleep(0.3)
    child.send("\r")
    child.expect("50 132")
    assert finish(child) == 0


def test_detach_then_attach_resumes_exactly_where_output_stopped(
    sandboxd: DaemonProcess,
) -> None:
    command_id = uuid.uuid4().hex
    loop = "i=0; while :; do i=$((i+1)); echo L$i; sleep 0.02; done"
    first = spawn(sandboxd.url, f"exec -it --id {command_id} -- sh -c {shlex.quote(loop)}")
    first.expect("L20\r\n")
    first.send("\x10\x11")  # ctrl-p ctrl-q
    first.expect(r"detached from \S+ \(still running\); resume: sandboxd attach --offsets (\d+):0")
    offset = int(first.match.group(1))
    assert finish(first) == 0
    before = shown(first).split(b"detached from")[0]
    time.sleep(0.5)  # the command runs on while nobody watches
    second = spawn(sandboxd.url, f"attach --offsets {offset}:0 {command_id}")
    second.expect(r"L(\d+)\r\n")
    while int(second.match.group(1)) < 80:
        second.expect(r"L(\d+)\r\n")
    second.send("\x10\x11")
    second.expect("detached from")
    assert finish(second) == 0
    after = shown(second).split(b"detached from")[0]
    numbers = [int(n) for n in re.findall(rb"L(\d+)\r\n", before + after)]
    assert numbers == list(range(1, numbers[-1] + 1)), "lost or repeated output"
    assert len(before) == offset  # the hint's offset is exactly what was shown


def test_ctrl_c_under_t_is_a_byte_for_the_remote_terminal(sandboxd: DaemonProcess) -> None:
    script = "trap 'echo TRAPPED; exit 3' INT; echo READY; while :; do sleep 0.05; done"
    child = spawn(sandboxd.url, f"exec -it -- sh -c {shlex.quote(script)}")
    child.expect("READY")
    child.sendintr()
    child.expect("TRAPPED")
    assert finish(child) == 3


def test_ctrl_c_without_t_sends_sigint_and_a_second_within_2s_kills(
    sandboxd: DaemonProcess,
) -> None:
    script = "trap 'echo TRAPPED' INT; echo READY; while :; do sleep 0.05; done"
    child = spawn(sandboxd.url, f"exec -- sh -c {shlex.quote(script)}")
    child.expect("READY")
    child.sendintr()  # the terminal's SIGINT goes to the CLI, which forwards it
    child.expect("TRAPPED")
    time.sleep(2.5)  # outside the 2-second window: another is just another SIGINT
    child.sendintr()
    child.expect("TRAPPED")
    child.sendintr()  # within 2 s of the last one: kill
    assert finish(child) == 130


def test_the_terminal_is_restored_after_the_daemon_is_killed_mid_stream(
    tmp_path: Path,
) -> None:
    daemon = start_daemon("--stop-grace", "1")
    try:
        before, after = tmp_path / "before", tmp_path / "after"
        child = pexpect.spawn(
            "/bin/sh",
            [
                "-c",
                f"stty -g > {before}; {CLI_LINE} exec -it -- sh -c 'echo READY; "
                f'printf "\\033[?1049h\\033[?25l"; sleep 5\'; echo RC=$?; stty -g > {after}',
            ],
            env=cli_env(daemon.url, SANDBOXD_RECONNECT_SECONDS="1"),
            timeout=30,
        )
        child.expect("READY")
        time.sleep(0.3)
        daemon.process.send_signal(signal.SIGKILL)
        child.expect(r"RC=(\d+)")
        assert child.match.group(1) == b"125"
        assert b"lost the connection" in child.before and b"sandboxd attach --offsets" in (
            child.before
        )
        assert b"\x1b[?1049l\x1b[?25h" in child.before  # the screen modes were undone
        child.expect(pexpect.EOF)
        assert before.read_text() == after.read_text()
    finally:
        daemon.process.wait(timeout=30)
        if daemon.process.stderr is not None:
            daemon.process.stderr.close()


@pytest.mark.skipif(sys.platform != "linux", reason="pty semantics")
def test_t_without_a_terminal_warns_and_runs_without_it(sandboxd: DaemonProcess) -> None:
    import subprocess

    done = subprocess.run(
        [*CLI, "exec", "-t", "--", "sh", "-c", "test -t 1 && echo tty || echo notty"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        env=cli_env(sandboxd.url),
    )
    assert done.stdout == b"notty\n" and b"not a TTY" in done.stderr


def test_shell_is_an_interactive_login_shell_with_its_exit_status(
    sandboxd: DaemonProcess,
) -> None:
    child = spawn(sandboxd.url, "shell")
    child.send("echo $((6*7)); tty\r")
    child.expect("42")
    child.expect("/dev/pts/")
    child.send("exit 5\r")
    assert finish(child) == 5


def test_a_read_only_attach_sees_output_and_ctrl_c_only_detaches(
    sandboxd: DaemonProcess,
) -> None:
    command_id = uuid.uuid4().hex
    loop = "i=0; while :; do i=$((i+1)); echo R$i; sleep 0.05; done"
    runner = spawn(sandboxd.url, f"exec -d --id {command_id} -- sh -c {shlex.quote(loop)}")
    assert finish(runner) == 0
    watcher = spawn(sandboxd.url, f"attach --read-only {command_id}")
    watcher.expect("R10\r\n")
    watcher.sendintr()
    watcher.expect("detached from")
    assert finish(watcher) == 0
    tail = spawn(sandboxd.url, f"logs -n 1 {command_id}")
    tail.expect(r"R\d+")  # still running: the watcher's Ctrl-C did not reach it
    assert finish(tail) == 0
    assert finish(spawn(sandboxd.url, f"kill {command_id}")) == 0
