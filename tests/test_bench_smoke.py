"""A quick run of every benchmark workload (``bench/run.py --quick``): the benchmarks
themselves stay runnable, and their verification (byte counts, sha256, zero loss) holds.
The timing targets are checked by ``make bench``, never here."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_every_workload_runs_and_verifies_in_quick_mode() -> None:
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--no-save"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for workload in (
        "start latency p50",
        "CLI `sandboxd exec -- true` wall",
        "throughput",
        "lines_76",
        "10 clients: commands/s (failures 0)",
        "100 clients: commands/s (failures 0)",
        "fan-out 10 x 5 MB (clients with loss: 0)",
        "fan-out 100 x 5 MB (clients with loss: 0)",
        "PTY throughput",
        "RSS per finished session",
        "RSS per running session",
        "replay 8 MiB: complete",
        "fast client, 1 KB/s client on the same command",
        "fast client, 1 KB/s client on the other command",
        "SDK 1 KiB write + read round trips",
        "download 16 MiB",
        "upload 16 MiB",
        "tunnel 16 MiB client -> sandbox",
        "tunnel 16 MiB sandbox -> client",
        "upgrade (5): trigger -> new image accepting p99",
        "upgrade (5): stream gap, client side p50",
        "upgrade (5): lost or duplicated bytes: 0",
    ):
        assert workload in table, table
    if shutil.which("websocketd"):
        assert "websocketd not installed" not in table
    if os.access("/usr/sbin/nginx", os.X_OK):
        assert "nginx not installed" not in table
        assert "nginx GET" in table
