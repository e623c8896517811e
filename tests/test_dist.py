"""The single-file build (``make dist``) runs as PID 1 of a root file system that holds
no Python: only the artifact, bash, a few coreutils and the C libraries they link."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

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
def image(tmp_path: Path) -> Path:
    """A root file system: the artifact at /usr/local/bin/sandboxd, bash, coreutils."""
    assert DIST.is_file(), f"{DIST} is missing: `make dist` builds it (`make test` does)"
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
    _copy_in(root, DIST, Path("/usr/local/bin/sandboxd"))
    libraries = set().union(*map(_libraries, [DIST, *binaries]))
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
    launcher = [UNSHARE or "unshare", "--pid", "--fork", "--mount", "--propagation", "private"]
    program = ["sh", "-c", enter, "sh", str(image)]
    daemon = start_daemon("--stop-grace", "1", launcher=launcher, program=program)
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)
        if daemon.process.stderr is not None:
            daemon.process.stderr.close()


def test_the_artifact_runs_as_pid_1_without_python_and_serves_the_sdk(
    pid1: DaemonProcess, image: Path
) -> None:
    (init,) = psutil.Process(pid1.process.pid).children()
    assert Path(init.exe()) == image / "usr/local/bin/sandboxd"
    result = sdk_sandbox(pid1.url).run(
        "echo pid1=$(cat /proc/1/comm); command -v python3 python || echo no python; "
        "for i in 1 2 3; do setsid sleep 0.2 & done; echo done >&2",
        timeout=30,
    )

    assert result.exit_code == 0
    assert result.stdout == "pid1=sandboxd\nno python\n"
    assert result.stderr == "done\n"
    deadline = time.monotonic() + 5  # the orphaned sleeps end and are reaped
    while time.monotonic() < deadline:
        tree = init.children(recursive=True)
        if all(p.status() != psutil.STATUS_ZOMBIE for p in tree) and len(tree) == 1:
            break
        time.sleep(0.1)
    assert [p.name() for p in init.children(recursive=True)] == ["sandboxd"]

    init.send_signal(signal.SIGTERM)  # what `docker stop` does
    assert pid1.process.wait(timeout=30) == 0
    assert pid1.reader is not None
    pid1.reader.join(timeout=10)
    assert [e["msg"] for e in pid1.logs if e.get("logger") == "sandboxd"][-1] == "stopped"
