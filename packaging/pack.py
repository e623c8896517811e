"""Append a one-folder PyInstaller build to ``launcher`` (packaging/launcher.c), making the
single-file sandboxd: ``python packaging/pack.py LAUNCHER ONEDIR OUTPUT``.

The payload is one zlib stream of records (directories, files, symlinks, then an end
record); the trailer says where the payload is and names it by the start of its sha256, so
the launcher can reuse an earlier unpacking of the very same build. launcher.c documents
the layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

MAGIC = b"SBXDPAK1"


def _record(kind: bytes, mode: int, name: str, data: bytes) -> bytes:
    path = name.encode()
    return kind + struct.pack("<IH", mode, len(path)) + path + struct.pack("<Q", len(data)) + data


def _records(root: Path) -> Iterator[bytes]:
    """Parents before their children, in a stable order."""
    for entry in sorted(root.rglob("*")):
        name = entry.relative_to(root).as_posix()
        info = entry.lstat()
        if entry.is_symlink():
            yield _record(b"l", 0o777, name, os.readlink(entry).encode())
        elif entry.is_dir():
            yield _record(b"d", info.st_mode & 0o7777, name, b"")
        else:
            yield _record(b"f", info.st_mode & 0o7777, name, entry.read_bytes())
    yield b"e"


def pack(launcher: Path, onedir: Path, output: Path) -> None:
    """Write ``output``: ``launcher``, the compressed ``onedir``, the trailer."""
    if not (onedir / "sandboxd").is_file():
        raise SystemExit(f"{onedir} holds no sandboxd program: not a one-folder build")
    compressor = zlib.compressobj(9)
    payload = b"".join(compressor.compress(r) for r in _records(onedir)) + compressor.flush()
    partial = output.with_name(output.name + ".partial")
    shutil.copyfile(launcher, partial)
    with partial.open("ab") as out:
        offset = out.tell()
        out.write(payload)
        payload_id = hashlib.sha256(payload).hexdigest()[:16].encode()
        checksum = zlib.crc32(payload)
        out.write(struct.pack("<QQII", offset, len(payload), checksum, 0) + payload_id + MAGIC)
    partial.chmod(0o755)
    partial.replace(output)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    pack(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
