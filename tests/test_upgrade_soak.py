"""Live upgrade soak (issue 11): the daemon re-execs itself again and again, at random
intervals of 0.2-1.5 s, alternately on SIGUSR2 and ``POST /admin/upgrade``, while ten
commands run and the released Python and TypeScript SDKs stream them. Afterwards every
stream is byte-exact (as the clients collected it and as a replay from offset 0), every
exit code is exact, and the daemon is the same process holding what it held before.

``make test`` runs a short version (5 upgrades, an 8 MB fast stream); ``make soak`` the
full one (``UPGRADE_SOAK_UPGRADES=20 UPGRADE_SOAK_MB=50``). ``UPGRADE_SOAK_SEED`` replays
a run's intervals (the seed is printed, ``-s``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio

from tests.helpers import run_command
from tests.sdk.conftest import DaemonProcess
from tests.upgrade_clients import (
    ClientResult,
    TsClients,
    python_sdk_stream,
    replay,
    start_thread,
)
from tests.upgrade_helpers import (
    Command,
    ConnectProbe,
    StreamDigest,
    digest,
    fds,
    fds_without_cloexec,
    gated_exit_command,
    healthz,
    ignores_sigchld,
    loop_command,
    mismatches,
    rss,
    seq_command,
    trigger,
    upgrade_daemon,
    wait_generation,
    wait_no_zombies,
)

pytestmark = pytest.mark.sdk

UPGRADES = int(os.environ.get("UPGRADE_SOAK_UPGRADES", "5"))
MEGABYTES = int(os.environ.get("UPGRADE_SOAK_MB", "8"))
SEED = int(os.environ.get("UPGRADE_SOAK_SEED", str(random.randrange(1 << 32))))
MiB = 1024 * 1024


def commands(tmp: Path) -> tuple[list[Command], list[Command], dict[str, int]]:
    """The ten commands (five for the Python SDK, five for the TypeScript SDK), and at
    which upgrade each gated command is released."""
    stop = tmp / "stop"
    python = [
        loop_command("p1", stop),
        loop_command("p2", stop),
        loop_command("t1", stop, pty=True),
        seq_command("big", MEGABYTES * 1_000_000),
        gated_exit_command("exits", tmp / "exits", 3000, "exit 7", 7),
    ]
    ts = [
        loop_command("p3", stop),
        loop_command("p4", stop),
        loop_command("t2", stop, pty=True),
        loop_command("t3", stop, pty=True),
        gated_exit_command("signalled", tmp / "signalled", 3000, "kill -USR1 $$", 128 + 10),
    ]
    gates = {"exits": max(1, UPGRADES // 2), "signalled": UPGRADES}
    return python, ts, gates


def test_the_checker_catches_one_dropped_byte() -> None:
    """The negative control of the sha256 check every upgrade test relies on."""
    command = loop_command("p1", Path("/nonexistent"))
    whole = command.expected("stdout", b"p1 end 20\n")
    assert whole.count(b"\n") == 21
    for data, bad in ((whole, False), (whole[:500] + whole[501:], True), (whole + b"x", True)):
        got = StreamDigest()
        got.update(data)
        stderr = StreamDigest()
        stderr.update(command.expected("stderr", b"p1 end 20\n"))
        found = mismatches(command, {"stdout": got, "stderr": stderr}, 0, "control")
        assert bool(found) is bad, found
    assert digest(whole) != digest(whole.replace(b"00000007", b"00000008"))


def _baseline_fds(daemon: DaemonProcess) -> int:
    """The daemon's fd count once a command has come and gone."""
    assert (
        trio.run(run_command, f"ws://{daemon.address}/execute/ws", "true").terminal["exit_code"]
        == 0
    )
    time.sleep(0.5)
    return len(fds(daemon.process.pid))


def _wait_fds(pid: int, baseline: int, within: float) -> int:
    deadline = time.monotonic() + within
    while (count := len(fds(pid))) != baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_upgrades_under_ten_streaming_commands_lose_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    python_cmds, ts_cmds, gates = commands(tmp_path)
    every = {c.key: c for c in python_cmds + ts_cmds}
    ring = max(64 * MiB, 2 * MEGABYTES * 1_000_000)  # the whole fast stream stays replayable
    started_at = time.monotonic()
    with upgrade_daemon("--ring-bytes", str(ring)) as daemon:
        pid = daemon.process.pid
        url = daemon.url
        baseline = _baseline_fds(daemon)
        with ConnectProbe(daemon.address) as probe:
            py_results = {c.key: ClientResult(c.key) for c in python_cmds}
            threads = [
                start_thread(python_sdk_stream, url, c, py_results[c.key]) for c in python_cmds
            ]
            ts = TsClients.start(url, ts_cmds)
            try:
                results = {**py_results, **ts.results}
                for result in results.values():
                    assert result.started.wait(60), result.key
                    assert result.error is None, (result.key, result.error)
                version = healthz(daemon.address)["version"]
                command_pids = {s["command_id"]: s["pid"] for s in _sessions(daemon)}
                extra = _held_fds(command_pids.values())
                assert extra == {}, f"commands hold fds beyond 0-2: {extra}"

                swaps: list[float] = []
                rss_net: dict[int, int] = {}
                for n in range(1, UPGRADES + 1):
                    time.sleep(rng.uniform(0.2, 1.5))
                    for key, at in gates.items():
                        if at == n:
                            (tmp_path / key).touch()  # the command ends while this upgrade runs
                    trigger(daemon, "signal" if n % 2 else "http")
                    health = wait_generation(daemon.address, n)
                    assert health["pid"] == pid
                    assert health["last_upgrade"]["result"] == "ok", health
                    swaps.append(health["last_upgrade"]["swap_ms"])
                    if n in (1, UPGRADES):
                        rss_net[n] = rss(pid) - health["buffered_bytes"]
                for key in gates:
                    (tmp_path / key).touch()  # (already there unless UPGRADES is 0)
                (tmp_path / "stop").touch()
                for thread in threads:
                    thread.join(timeout=300)
                    assert not thread.is_alive()
                ts_stderr = ts.wait(timeout=300)
            finally:
                ts.close()

        wrong: list[str] = []
        for key, result in results.items():
            if result.error is not None:
                wrong.append(f"{key}: the SDK raised {result.error}")
            wrong += mismatches(every[key], result.streams, result.exit_code, "client")
        for key, result in results.items():
            assert result.command_id is not None, key
            replayed, code = trio.run(
                replay, f"ws://{daemon.address}/execute/ws", result.command_id
            )
            wrong += mismatches(every[key], replayed, code, "replay")
        health = healthz(daemon.address)
        fresh = trio.run(run_command, f"ws://{daemon.address}/execute/ws", "ls /proc/$$/fd; true")
        zombies = wait_no_zombies(pid)
        fd_count = _wait_fds(pid, baseline, within=15)
        leaking = fds_without_cloexec(pid)
        sigchld_ignored = ignores_sigchld(pid)

    print(
        f"\nupgrade soak seed {SEED}: {UPGRADES} upgrades, {MEGABYTES} MB fast stream, "
        f"{time.monotonic() - started_at:.1f} s; swap_ms {sorted(swaps)}; "
        f"connects {probe.attempts} (refused {probe.refused}); rss-buffered {rss_net}"
    )
    assert wrong == [], f"seed {SEED}: " + "\n".join(wrong) + f"\nts stderr: {ts_stderr[-2000:]}"
    assert health["pid"] == pid and health["generation"] == UPGRADES, health
    assert health["version"] == version
    assert probe.refused == 0 and probe.errors == [], (probe.refused, probe.errors[:5])
    assert probe.attempts > 0
    assert zombies == [], zombies
    assert fd_count == baseline, (fd_count, baseline, fds(pid))
    assert leaking == {}, f"fds a command would inherit: {leaking}"
    assert not sigchld_ignored
    assert fresh.text("stdout") == "0\n1\n2\n", fresh.text("stdout")
    assert rss_net[UPGRADES] <= rss_net[1] * 1.1, rss_net


def _sessions(daemon: DaemonProcess) -> list[dict[str, object]]:
    from tests.upgrade_helpers import sessions

    return sessions(daemon.address)


def _held_fds(pids: Iterable[object]) -> dict[object, dict[int, str]]:
    """The fds beyond 0-2 each command holds, that it still holds, to the same file, half a
    second later: a command's shell holds a pipe of its own at fd 3 while it reads a
    ``$(...)`` (``for i in $(seq ...)``), which a single look could take for a leaked fd."""
    first = {pid: fds for pid in pids if (fds := _extra_fds(pid))}
    if not first:
        return {}
    time.sleep(0.5)
    held: dict[object, dict[int, str]] = {}
    for pid, fds in first.items():
        again = _extra_fds(pid)
        if kept := {fd: target for fd, target in fds.items() if again.get(fd) == target}:
            held[pid] = kept
    return held


def _extra_fds(pid: object) -> dict[int, str]:
    """The fds beyond 0-2 a command's process holds ({} if it has ended)."""
    assert isinstance(pid, int)
    try:
        return {fd: target for fd, target in fds(pid).items() if fd > 2}
    except FileNotFoundError:
        return {}
