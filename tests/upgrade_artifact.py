"""A second single-file build for the live-upgrade tests, made without PyInstaller."""

from __future__ import annotations

import marshal
import struct
import zlib
from pathlib import Path

_COOKIE = struct.Struct("!8sIIII64s")
_TOC_ENTRY = struct.Struct("!IIIIBc")


def _with_entry_script(pkg: bytes, source: str) -> bytes:
    """PyInstaller's CArchive ``pkg`` with its ``entry`` script replaced by ``source``
    (the layout: PyInstaller/archive/readers.py; entries' data, the TOC, the cookie)."""
    magic, length, toc_offset, toc_length, pyvers, pylib = _COOKIE.unpack(pkg[-_COOKIE.size :])
    start = len(pkg) - length
    toc = pkg[start + toc_offset : start + toc_offset + toc_length]
    entries = []
    at = 0
    while at < len(toc):
        size, offset, stored, full, compressed, kind = _TOC_ENTRY.unpack_from(toc, at)
        name = toc[at + _TOC_ENTRY.size : at + size].rstrip(b"\0")
        data = pkg[start + offset : start + offset + stored]
        if name == b"entry":
            raw = marshal.dumps(compile(source, "entry.py", "exec"))
            data, full, compressed = zlib.compress(raw, 9), len(raw), 1
        entries.append((name, data, full, compressed, kind))
        at += size
    out = bytearray()
    rows = []
    for name, data, full, compressed, kind in entries:
        rows.append((len(out), len(data), full, compressed, kind, name))
        out += data
    new_toc = bytearray()
    for offset, stored, full, compressed, kind, name in rows:
        padded = len(name) + 1
        padded += -(_TOC_ENTRY.size + padded) % 16
        new_toc += _TOC_ENTRY.pack(_TOC_ENTRY.size + padded, offset, stored, full, compressed, kind)
        new_toc += name.ljust(padded, b"\0")
    toc_at = len(out)
    out += new_toc
    total = len(out) + _COOKIE.size
    out += _COOKIE.pack(magic, total, toc_at, len(new_toc), pyvers, pylib)
    return bytes(out)


def rebranded_artifact(onedir: Path, launcher: Path, version: str, work: Path) -> Path:
    """A single-file build like ``make dist``'s, whose sandboxd reports ``version``: the
    one-folder build is copied, its program's entry script (in the ELF section ``pydata``,
    PyInstaller's CArchive) is replaced by one that sets ``sandboxd.__version__`` first,
    and packaging/pack.py packs it (no PyInstaller run)."""
    import importlib.util
    import shutil
    import subprocess

    copy = work / "onedir"
    shutil.copytree(onedir, copy, symlinks=True)
    program = copy / "sandboxd"
    section = work / "pydata"
    subprocess.run(
        ["objcopy", "--dump-section", f"pydata={section}", str(program), str(work / "scratch")],
        check=True,
    )
    source = (
        "import sandboxd\n"
        f"sandboxd.__version__ = {version!r}\n"
        "from sandboxd.cli import main\n"
        "main()\n"
    )
    section.write_bytes(_with_entry_script(section.read_bytes(), source))
    subprocess.run(["objcopy", "--update-section", f"pydata={section}", str(program)], check=True)
    spec = importlib.util.spec_from_file_location(
        "pack", Path(__file__).parents[1] / "packaging" / "pack.py"
    )
    assert spec is not None and spec.loader is not None
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    artifact = work / f"sandboxd-{version}"
    pack.pack(launcher, copy, artifact)
    return artifact
