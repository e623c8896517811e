"""Live upgrade (issue 11) of the single-file build (``make dist``): the running artifact
is replaced by a second, different one uploaded as the body of ``POST /admin/upgrade``,
and back, and then re-execs what is installed; the version in /healthz alternates, the
pid stays, and a command streamed by the Python SDK throughout stays byte-exact.

The second artifact is the same one-folder build with another version: its entry script
is swapped inside the program's CArchive and packaging/pack.py packs it, so no PyInstaller
run is needed (``rebranded_artifact``). The build directory comes from ``make dist``
(``make test`` builds it first); without it these tests are skipped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.upgrade_clients import (
    ClientResult,
    python_sdk_stream,
    replay,
    start_thread,
)
from tests.upgrade_helpers import (
    healthz,
    loop_command,
    mismatches,
    post_upgrade,
    upgrade_daemon,
    wait_generation,
)

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist" / "sandboxd"
LAUNCHER = ROOT / "build" / "launcher"
ONEDIR = ROOT / "build" / "onedir" / "sandboxd"

pytestmark = [
    pytest.mark.sdk,
    pytest.mark.skipif(
        not (DIST.is_file() and LAUNCHER.is_file() and (ONEDIR / "sandboxd").is_file()),
        reason="needs `make dist` (dist/sandboxd, build/launcher, build/onedir)",
    ),
    pytest.mark.skipif(shutil.which("objcopy") is None, reason="needs objcopy (binutils)"),
]


def test_the_single_file_build_upgrades_to_another_artifact_and_back(tmp_path: Path) -> None:
    import trio

    work = tmp_path / "work"
    work.mkdir()
    from tests.upgrade_artifact import rebranded_artifact

    rebranded = rebranded_artifact(ONEDIR, LAUNCHER, "0.1.0+upgrade-b", work)
    other = rebranded.read_bytes()
    original = DIST.read_bytes()
    assert other != original
    installed = tmp_path / "bin" / "sandboxd"
    installed.parent.mkdir()
    shutil.copy2(DIST, installed)
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    stop = tmp_path / "stop"
    command = loop_command("d", stop)
    with upgrade_daemon(
        launcher=["env", f"SANDBOXD_UNPACK_DIR={unpack}"], program=[str(installed)]
    ) as daemon:
        pid = daemon.process.pid
        first = healthz(daemon.address)
        assert first["pid"] == pid and first["generation"] == 0
        result = ClientResult("d")
        thread = start_thread(python_sdk_stream, daemon.url, command, result)
        assert result.started.wait(60) and result.error is None, result.error
        versions = [first["version"]]
        for n, body in enumerate((other, original, b""), start=1):
            time.sleep(0.5)
            status, answer = post_upgrade(daemon.address, body)
            assert status == 202, answer
            assert answer["generation"] == n and answer["from_version"] == versions[-1], answer
            health = wait_generation(daemon.address, n)
            assert health["pid"] == pid, health
            assert health["last_upgrade"]["to_version"] == health["version"], health
            versions.append(health["version"])
        time.sleep(0.5)
        stop.touch()
        thread.join(timeout=60)
        assert result.command_id is not None
        replayed = trio.run(replay, f"ws://{daemon.address}/execute/ws", result.command_id)
    v0 = versions[0]
    assert v0 != "0.1.0+upgrade-b"
    assert versions == [v0, "0.1.0+upgrade-b", v0, v0], versions
    assert result.error is None, result.error
    wrong = mismatches(command, result.streams, result.exit_code, "client")
    wrong += mismatches(command, *replayed, "replay")
    assert wrong == [], wrong
    # the uploads went to the one fixed path beside the artifact, and left nothing else
    landed = installed.parent / "sandboxd.next"
    assert sorted(p.name for p in installed.parent.iterdir()) == ["sandboxd", "sandboxd.next"]
    assert landed.stat().st_mode & 0o777 == 0o755
    assert landed.read_bytes() == original
    assert installed.read_bytes() == original  # the installed one was never written
