"""The single-file build (``make dist``): a static launcher that unpacks the bundle once
and execs it in place. It runs as PID 1 of a root file system that holds no Python: only
the artifact, bash, a few coreutils and the C libraries they link."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from tests.helpers import command_processes, is_spawner_helper
from tests.sdk.conftest import DaemonProcess, sdk_sandbox, start_daemon

DIST = Path(__file__).resolve().parents[1] / "dist" / "sandboxd"
UNSHARE = shutil.which("unshare")
#: The C runtime every image has: the bundle's own libraries (libpython, OpenSSL, ...) ride
#: inside the artifact and load these from the image.
C_RUNTIME = (
    "libc.so",
    "libm.so",
    "libdl.so",
    "libpthread.so",
    "librt.so",
    "libutil.so",
    "libresolv.so",
    "libgcc_s.so",
    "libnss_files.so",
    "libnss_dns.so",
    "libz.so",
)
TOOLS = ["bash", "cat", "echo", "ls", "sleep", "head", "env", "id", "setsid", "sha256sum"]
TOKEN = "dist-test-token-4b1d"
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare (CI has both)"
)


def _libraries(binary: Path) -> set[Path]:
    """The shared libraries ``binary`` loads, as ldd resolves them on this machine."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return {Path(m) for m in re.findall(r"(/\S+\.so[.\d]*)", out)}


def _copy_in(root: Path, source: Path, target: Path | None = None) -> None:
    """Copy ``source`` (followed through symlinks) to the same path under ``root``."""
    destination = root / (target or source).relative_to("/")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source.resolve(), destination)


@pytest.fixture
def artifact() -> Path:
    """The single-file build."""
    assert DIST.is_file(), f"{DIST} is missing: `make dist` builds it (`make test` does)"
    return DIST


@pytest.fixture
def image(tmp_path: Path, artifact: Path) -> Path:
    """A root file system: the artifact at /usr/local/bin/sandboxd, bash, coreutils."""
    root = tmp_path / "image"
    for name in ("usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "tmp", "proc", "dev", "root"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):  # merged /usr, as Debian and Ubuntu lay it out
        (root / link).symlink_to(f"usr/{link}")
    (root / "tmp").chmod(0o1777)
    binaries = [Path(found) for tool in TOOLS if (found := shutil.which(tool))]
    assert len(binaries) == len(TOOLS)
    for binary in binaries:
        _copy_in(root, binary, Path("/usr/bin") / binary.name)
    _copy_in(root, artifact, Path("/usr/local/bin/sandboxd"))
    libraries = set().union(*map(_libraries, [artifact, *binaries]))
    libc_dir = next(p.parent for p in libraries if p.name == "libc.so.6")
    libraries |= {p for p in libc_dir.iterdir() if p.name.startswith(C_RUNTIME)}
    for library in libraries:
        _copy_in(root, library)  # /lib/... lands in /usr/lib/... through the symlink
    (root / "usr/bin/sh").symlink_to("bash")
    assert not [p for p in root.rglob("python*")], "the image must hold no Python"
    return root


@pytest.fixture
def pid1(image: Path) -> Iterator[DaemonProcess]:
    """The artifact as PID 1 of a new PID namespace, chrooted into ``image``."""
    enter = (
        'root=$1; shift; mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" && '
        'exec chroot "$root" /usr/local/bin/sandboxd "$@"'
    )
    launcher = [
        UNSHARE or "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--propagation",
        "private",
    ]
    program = ["sh", "-c", enter, "sh", str(image)]
    daemon = start_daemon("--stop-grace", "1", "--token", TOKEN, launcher=launcher, program=program)
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)
        if daemon.process.stderr is not None:
            daemon.process.stderr.close()


def _namespace_init(pid1: DaemonProcess) -> psutil.Process:
    (init,) = psutil.Process(pid1.process.pid).children()
    return init


def _wait_until_empty(listing: Callable[[], list[T]]) -> list[T]:
    """Poll ``listing`` for up to 5 s until it is empty; what it last returned."""
    deadline = time.monotonic() + 5
    while (items := listing()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return items


def test_the_artifact_runs_as_pid_1_without_python_and_serves_the_sdk(
    pid1: DaemonProcess, image: Path
) -> None:
    init = _namespace_init(pid1)
    # The launcher exec'd the unpacked program: PID 1 is sandboxd itself, no loader above it.
    unpacked = Path(init.exe())
    assert unpacked.name == "sandboxd" and unpacked.parent.parent == image / "tmp"
    assert unpacked.parent.name.startswith("sandboxd-")
    assert unpacked.parent.stat().st_mode & 0o777 == 0o700
    assert TOKEN not in " ".join(init.cmdline())  # moved into the environment, then exec'd
    # The build carries the spawner helper, and the daemon runs it.
    (helper,) = [p for p in init.children() if is_spawner_helper(p)]
    assert Path(helper.exe()) == unpacked.parent / "_internal/sandboxd/runtime/sandboxd-spawner"
    result = sdk_sandbox(pid1.url, api_key=TOKEN).run(
        "echo pid1=$(cat /proc/1/comm); command -v python3 python || echo no python; "
        'echo "ld=${LD_LIBRARY_PATH-unset} pyi=$(compgen -e _PYI_)"; '
        "for i in 1 2 3; do setsid sleep 0.2 & done; echo done >&2",
        timeout=30,
    )

    assert result.exit_code == 0
    assert result.stdout == "pid1=sandboxd\nno python\nld=unset pyi=\n"
    assert result.stderr == "done\n"
    # The orphaned sleeps ended and were reaped.
    assert _wait_until_empty(lambda: command_processes(init, recursive=True)) == []

    init.send_signal(signal.SIGTERM)  # what `docker stop` does
    assert pid1.process.wait(timeout=30) == 0
    assert pid1.reader is not None
    pid1.reader.join(timeout=10)
    assert [e["msg"] for e in pid1.logs if e.get("logger") == "sandboxd"][-1] == "stopped"


def test_the_artifact_serves_the_browser_terminal_with_its_xterm_files(
    pid1: DaemonProcess,
) -> None:
    with urllib.request.urlopen(f"{pid1.url}/", timeout=10) as page:
        html = page.read()
    with urllib.request.urlopen(f"{pid1.url}/static/vendor/xterm.mjs", timeout=10) as module:
        xterm = module.read()
    assert b'<script type="module" src="static/app.js">' in html  # not the missing-files page
    assert xterm.rstrip().endswith(b"export{Dl as Terminal};")


def test_orphans_of_a_process_that_entered_from_outside_are_reaped(pid1: DaemonProcess) -> None:
    """What `docker exec ... sh -c 'sleep 1 &'` leaves: an orphan whose parent was never a
    command, so only the namespace's init can reap it."""
    init = _namespace_init(pid1)
    subprocess.run(
        ["nsenter", "--target", str(init.pid), "--pid", "--", "sh", "-c", "sleep 1 & exit"],
        check=True,
        timeout=10,
    )

    def sleeps() -> list[str]:
        return [p.status() for p in init.children() if p.name() == "sleep"]

    assert len(sleeps()) == 1  # the orphan went to PID 1 (running, sleeping or ended)
    assert _wait_until_empty(sleeps) == []  # a zombie would stay listed


# ---- the launcher: where it unpacks, and what it refuses ---------------------------------


@dataclass(frozen=True)
class Trailer:
    """The end of the artifact: where its payload is, and its id (launcher.c documents
    the layout)."""

    offset: int
    length: int
    payload_id: str


def _trailer(data: bytes) -> Trailer:
    trailer = data[-48:]
    assert trailer[40:] == b"SBXDPAK1"
    offset, length = struct.unpack("<QQ", trailer[:16])
    return Trailer(offset, length, trailer[24:40].decode())


def _run_artifact(artifact: Path, base: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "SANDBOXD_UNPACK_DIR": str(base)}
    return subprocess.run(
        [str(artifact), "--version"],
        capture_output=True,
        text=True,
        errors="replace",
        env=env,
        timeout=30,
    )


@pytest.fixture
def unpack_base(tmp_path: Path) -> Path:
    base = tmp_path / "unpack"
    base.mkdir()
    return base


def test_eight_starts_at_once_unpack_one_bundle_that_later_starts_reuse(
    artifact: Path, unpack_base: Path
) -> None:
    def start(_: int) -> subprocess.CompletedProcess[str]:
        return _run_artifact(artifact, unpack_base)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(start, range(8)))
    assert [(r.returncode, r.stdout, r.stderr) for r in results] == [
        (0, "sandboxd 0.1.0\n", "")
    ] * 8
    unpacked = unpack_base / f"sandboxd-{_trailer(artifact.read_bytes()).payload_id}"
    assert list(unpack_base.iterdir()) == [unpacked]  # the losers of the race cleaned up
    program = unpacked / "sandboxd"
    before = program.stat()

    assert _run_artifact(artifact, unpack_base).returncode == 0
    assert (program.stat().st_ino, program.stat().st_mtime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
    )


def test_an_unpacked_bundle_others_could_have_written_is_never_run(
    artifact: Path, unpack_base: Path
) -> None:
    """A stranger who plants a program under the expected name gets nothing run."""
    planted = unpack_base / f"sandboxd-{_trailer(artifact.read_bytes()).payload_id}"
    planted.mkdir()
    marker = unpack_base / "ran"
    (planted / "sandboxd").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (planted / "sandboxd").chmod(0o755)
    planted.chmod(0o777)

    result = _run_artifact(artifact, unpack_base)

    assert (result.returncode, result.stdout) == (0, "sandboxd 0.1.0\n")
    assert not marker.exists()
    (private,) = [p for p in unpack_base.iterdir() if p not in (planted, marker)]
    assert private.name.startswith(".sandboxd-") and private.stat().st_mode & 0o777 == 0o700


def test_a_damaged_artifact_is_refused_with_a_reason_and_leaves_nothing(
    artifact: Path, unpack_base: Path, tmp_path: Path
) -> None:
    data = bytearray(artifact.read_bytes())
    trailer = _trailer(data)
    middle = trailer.offset + trailer.length // 2
    data[middle : middle + 64] = bytes(64)
    damaged = tmp_path / "sandboxd"
    damaged.write_bytes(bytes(data))
    damaged.chmod(0o755)

    result = _run_artifact(damaged, unpack_base)

    assert result.returncode == 127
    assert "sandboxd launcher: payload is corrupt" in result.stderr
    assert list(unpack_base.iterdir()) == []
