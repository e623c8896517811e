"""``sandboxd cp [-r] SRC DST``: files in and out of the sandbox over ``/upload``,
``/download`` and ``/glob`` (no tar in the sandbox).

A remote path is written ``:/path``; ``-`` is stdin (as SRC) or stdout (as DST). A remote
DST ending in ``/`` is a directory to copy into. Copying out never writes outside the
destination: every name the daemon lists is checked (no absolute paths, no ``..``), no
directory on the way may be a symlink, and each file is written to a temporary name and
renamed into place (so a symlink planted at the target is replaced, never followed).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import sys
import tempfile
from collections.abc import Iterator
from urllib.parse import quote

from sandboxd.client import http
from sandboxd.client.connection import CliError, Endpoint

BOUNDARY = "sandboxd-cli-3f9a1c0e7b2d4e58"
GLOB_LIMIT = 100_000


def _is_remote(path: str) -> bool:
    return path.startswith(":")


def _query(path: str) -> str:
    return "path=" + quote(path, safe="")


def upload_bytes(endpoint: Endpoint, remote: str, source: Iterator[bytes], size: int) -> None:
    """Write ``size`` bytes from ``source`` to the remote file ``remote``."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="file"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from source
        yield tail

    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(head) + size + len(tail)),
    }
    http.request(
        endpoint, "POST", "/upload?" + _query(remote), body(), headers, what=f"remote {remote}"
    ).read()


def _file_chunks(path: str) -> tuple[Iterator[bytes], int]:
    handle = open(path, "rb")  # noqa: SIM115 - closed by the generator
    size = os.fstat(handle.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(http.CHUNK):
                yield chunk

    return chunks(), size


def _upload(endpoint: Endpoint, src: str, remote: str, recursive: bool) -> None:
    if src == "-":
        data = sys.stdin.buffer.read()
        upload_bytes(endpoint, remote, iter([data]), len(data))
        return
    if not os.path.lexists(src):
        raise CliError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        if not recursive:
            raise CliError(f"{src} is a directory (use -r)")
        base = (
            posixpath.join(remote, os.path.basename(src.rstrip("/")))
            if remote.endswith("/")
            else remote
        )
        for folder, dirs, files in os.walk(src):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
            for name in files:
                local = os.path.join(folder, name)
                if os.path.islink(local):
                    continue  # symlinks are not followed out of the source
                rel = os.path.relpath(local, src).replace(os.sep, "/")
                chunks, size = _file_chunks(local)
                upload_bytes(endpoint, posixpath.join(base, rel), chunks, size)
        return
    if remote.endswith("/"):
        remote = posixpath.join(remote, os.path.basename(src))
    chunks, size = _file_chunks(src)
    upload_bytes(endpoint, remote, chunks, size)


def _safe_parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CliError(f"refusing the remote name {rel!r}: it would escape the destination")
    return parts


def _directory(path: str) -> None:
    """Make ``path`` a directory; refuse when it is anything else (a symlink above all)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise CliError(f"refusing to write through {path}: not a directory (a symlink?)")


def _download_file(endpoint: Endpoint, remote: str, local: str) -> None:
    """Download into ``local`` through a temporary name beside it, renamed at the end."""
    response = http.request(endpoint, "GET", "/download?" + _query(remote), what=f"remote {remote}")
    folder = os.path.dirname(local) or "."
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".sandboxd-cp-")
    try:
        with os.fdopen(fd, "wb") as out:
            response.copy_to(out)
        os.chmod(temporary, 0o644)
        os.replace(temporary, local)
    except BaseException:
        os.unlink(temporary)
        raise


def _download(endpoint: Endpoint, remote: str, dst: str, recursive: bool) -> None:
    if dst == "-":
        response = http.request(
            endpoint, "GET", "/download?" + _query(remote), what=f"remote {remote}"
        )
        response.copy_to(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    name = posixpath.basename(remote.rstrip("/")) or "root"
    if not recursive:
        target = os.path.join(dst, name) if os.path.isdir(dst) else dst
        _download_file(endpoint, remote, target)
        return
    listing = http.post_json(
        endpoint, "/glob", {"pattern": "**", "path": remote, "limit": GLOB_LIMIT}
    )
    if listing.get("truncated"):
        raise CliError(f"{remote} holds more than {GLOB_LIMIT} entries; copy it in parts")
    root = os.path.join(dst, name) if os.path.isdir(dst) else dst
    _directory(root)
    prefix = remote.rstrip("/") + "/"
    entries = sorted(listing["matches"], key=lambda m: (m["path"].count("/"), m["path"]))
    for match in entries:
        path = str(match["path"])
        if not path.startswith(prefix):
            raise CliError(f"refusing the remote name {path!r}: outside {remote}")
        parts = _safe_parts(path[len(prefix) :])
        folder = root
        for part in parts[:-1]:
            folder = os.path.join(folder, part)
            _directory(folder)
        target = os.path.join(folder, parts[-1])
        if match.get("is_dir"):
            _directory(target)
        else:
            _download_file(endpoint, path, target)


def copy(endpoint: Endpoint, src: str, dst: str, recursive: bool) -> int:
    """Copy ``src`` to ``dst``; exactly one of them is remote (``:/path``)."""
    if _is_remote(src) == _is_remote(dst):
        raise CliError("cp needs one remote path (:/path) and one local path (or -)")
    if _is_remote(dst):
        _upload(endpoint, src, dst[1:], recursive)
    else:
        _download(endpoint, src[1:], dst, recursive)
    return 0
