"""Live upgrade (issue 11) through the released SDKs, unmodified: a Python and a
TypeScript client streaming across upgrades see no error and get every byte; ``run()``
calls made back to back while the daemon swaps (some are bound to be in flight at the
commit) all succeed, through the SDKs' own retries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.sdk.conftest import sdk_sandbox
from tests.upgrade_clients import (
    TS_DIR,
    ClientResult,
    TsClients,
    python_sdk_stream,
    start_thread,
)
from tests.upgrade_helpers import (
    loop_command,
    mismatches,
    trigger,
    upgrade_daemon,
    wait_generation,
)

pytestmark = pytest.mark.sdk


def test_python_and_ts_clients_stream_across_upgrades_without_an_error(tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    py_cmd, ts_cmds = loop_command("py", stop, pty=True), [loop_command("ts", stop)]
    with upgrade_daemon() as daemon:
        py = ClientResult("py")
        thread = start_thread(python_sdk_stream, daemon.url, py_cmd, py)
        ts = TsClients.start(daemon.url, ts_cmds)
        for result in (py, *ts.results.values()):
            assert result.started.wait(60) and result.error is None, result.error
        for n, how in enumerate(("signal", "http"), start=1):
            time.sleep(0.5)
            trigger(daemon, how)
            wait_generation(daemon.address, n)
        time.sleep(0.5)
        stop.touch()
        thread.join(timeout=60)
        stderr = ts.wait(timeout=60)
    wrong = mismatches(py_cmd, py.streams, py.exit_code, "python")
    wrong += mismatches(ts_cmds[0], ts.results["ts"].streams, ts.results["ts"].exit_code, "ts")
    errors = [r.error for r in (py, *ts.results.values()) if r.error]
    assert errors == [] and wrong == [], (errors, wrong, stderr[-2000:])


def test_runs_in_flight_when_an_upgrade_starts_succeed_on_their_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the SDKs' real connect budget (120 s; the suite's conftest cuts it to 3 s so
    that a dead URL fails fast, shorter than a swap on a loaded machine)."""
    import langsmith.sandbox._ws_execute as ws_execute

    monkeypatch.setattr(ws_execute, "WS_CONNECT_BUDGET", 120.0)
    stop = tmp_path / "stop"
    node = shutil.which("node")
    assert node is not None
    outcomes: list[tuple[bool, float, str | None]] = []

    def python_runs(url: str, tag: str) -> None:
        sandbox = sdk_sandbox(url)
        i = 0
        while not stop.exists():
            started = time.monotonic()
            try:
                r = sandbox.run(f"echo {tag}{i}; echo e{i} >&2; exit {i % 7}", timeout=60)
                ok = (r.stdout, r.stderr, r.exit_code) == (f"{tag}{i}\n", f"e{i}\n", i % 7)
                outcomes.append((ok, time.monotonic() - started, None if ok else repr(r)))
            except Exception as error:  # what the SDK raised to user code
                outcomes.append((False, time.monotonic() - started, repr(error)))
            i += 1

    with upgrade_daemon(fault="exec-window-sleep=0.5") as daemon:
        ts = subprocess.Popen(
            [node, "upgrade.mjs", daemon.url, "runs", str(stop)],
            cwd=TS_DIR,
            env={**os.environ, "LANGSMITH_SANDBOX_WS_TIMEOUT_CONNECT_BUDGET": "120"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        threads = [
            threading.Thread(target=python_runs, args=(daemon.url, t), daemon=True)
            for t in ("a", "b")
        ]
        for thread in threads:
            thread.start()
        for n, how in enumerate(("http", "signal", "http"), start=1):
            time.sleep(0.7)
            trigger(daemon, how)
            wait_generation(daemon.address, n)
        time.sleep(0.5)
        stop.touch()
        for thread in threads:
            thread.join(timeout=120)
        out, err = ts.communicate(timeout=120)
    ts_runs = [json.loads(line) for line in out.splitlines()]
    failed = [o for o in outcomes if not o[0]] + [r for r in ts_runs if not r["ok"]]
    slowest = max(o[1] for o in outcomes), max(r["ms"] for r in ts_runs) / 1000
    print(f"\n{len(outcomes)} python runs, {len(ts_runs)} ts runs; slowest {slowest} s")
    assert failed == [], (failed[:5], err[-2000:])
    assert len(outcomes) > 10 and len(ts_runs) > 5
    # some runs really were held up by a swap (each swap holds the exec for 0.5 s)
    assert min(slowest) > 0.4, slowest
