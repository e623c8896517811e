"""``POST /upload`` and ``GET``/``HEAD /download`` (protocol.md §5.1-§5.4).

Uploads stream to a temporary file beside the target and are renamed over it only once
complete, so a failed or interrupted upload leaves the previous file untouched and no
partial file behind. Downloads stream from an fd opened once, so the size, ETag and body
all describe the same file even if it is replaced meanwhile.

File I/O runs in worker threads (``trio.to_thread``), batched to about 1 MiB per hop.
"""

from __future__ import annotations

import contextlib
import math
import mimetypes
import os
import stat
import tempfile

import trio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from sandboxd.core.errors import (
    FileNotFound,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
    ReadError,
    SandboxdError,
    WriteError,
)
from sandboxd.core.paths import (
    RangeNotSatisfiable,
    etag_matches,
    make_etag,
    parse_range,
    resolve_path,
)
from sandboxd.http.asgi import (
    Receive,
    Scope,
    Send,
    body_chunks,
    error_body,
    header,
    query_param,
    refuse_declared_over,
    respond,
    respond_json,
)

#: Files up to this size have their content in the ETag (so a same-size rewrite within
#: one timestamp tick still changes it); larger ones are identified by inode and times.
ETAG_CONTENT_LIMIT = 1024 * 1024
IO_BATCH = 1024 * 1024


def _os_error(exc: OSError, path: str, writing: bool) -> SandboxdError:
    """Map an OSError to the error the SDKs understand (§1.4)."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileNotFoundError) and not writing:
        return FileNotFound(f"{path}: no such file")
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"{path}: {reason}")
    return WriteError(f"{path}: {reason}") if writing else ReadError(f"{path}: {reason}")


# ---- upload --------------------------------------------------------------------------


class _FilePart:
    """Collects the ``file`` part of a multipart body as the parser reports it."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.found = 0
        self.complete = False
        self._in_file = False
        self._field = b""
        self._value = b""
        self._disposition = b""

    def callbacks(self) -> dict[str, object]:
        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._value += data[start:end]

        def on_header_end() -> None:
            if self._field.lower() == b"content-disposition":
                self._disposition = self._value
            self._field, self._value = b"", b""

        def on_headers_finished() -> None:
            _, options = parse_options_header(self._disposition)
            self._in_file = options.get(b"name") == b"file"
            self.found += self._in_file
            self._disposition = b""

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self._in_file:
                self.pending.append(data[start:end])

        def on_part_end() -> None:
            self._in_file = False

        def on_end() -> None:
            self.complete = True

        return {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        }


def _write_all(fd: int, pieces: list[bytes]) -> None:
    for piece in pieces:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]


async def _flush(fd: int, pieces: list[bytes], target: str) -> None:
    try:
        await trio.to_thread.run_sync(_write_all, fd, pieces)
    except OSError as exc:
        raise _os_error(exc, target, writing=True) from None


def _prepare_upload(target: str) -> tuple[int, str, os.stat_result | None]:
    """Make the parent dirs and a temp file beside ``target``; returns (fd, temp, old)."""
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        old = os.stat(target) if os.path.lexists(target) else None
    except OSError as exc:
        raise _os_error(exc, parent, writing=True) from None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise WriteError(f"{target}: is a directory")
    try:
        fd, temp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=".upload")
    except OSError as exc:
        raise _os_error(exc, parent, writing=True) from None
    return fd, temp, old


def _finish_upload(fd: int, temp: str, target: str, old: os.stat_result | None) -> None:
    """Give the temp file the old file's mode and owner (or 0644) and rename it in place."""
    try:
        if old is not None:
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(fd, old.st_uid, old.st_gid)
        else:
            os.fchmod(fd, 0o644)
        os.replace(temp, target)
    except OSError as exc:
        raise _os_error(exc, target, writing=True) from None


async def upload(scope: Scope, receive: Receive, send: Send, home: str, max_bytes: int) -> None:
    """Write the body's ``file`` part to ``?path=`` (overwrite, parents created).

    A body over ``max_bytes`` (0: no limit) is refused with 413: at once when its
    Content-Length says so, else as soon as that much has arrived (nothing is kept).
    """
    target = resolve_path(query_param(scope, "path"), home)
    limit = max_bytes or math.inf
    refuse_declared_over(scope, limit)
    mime, options = parse_options_header(header(scope, "content-type") or "")
    boundary = options.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise InvalidRequest("the body must be multipart/form-data with a part named 'file'")
    part = _FilePart()
    parser = MultipartParser(boundary, part.callbacks())  # type: ignore[arg-type]
    fd, temp, old = await trio.to_thread.run_sync(_prepare_upload, target)
    written = received = 0
    renamed = False
    try:
        async with contextlib.aclosing(body_chunks(receive)) as chunks:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"upload body over {max_bytes} bytes")
                try:
                    parser.write(chunk)
                except MultipartParseError as exc:
                    raise InvalidRequest(f"malformed multipart body: {exc}") from None
                buffered = sum(len(p) for p in part.pending)
                if buffered >= IO_BATCH:
                    pieces, part.pending = part.pending, []
                    await _flush(fd, pieces, target)
                    written += buffered
        if not part.complete:
            raise InvalidRequest("malformed multipart body: it ends before its closing boundary")
        if part.found != 1:
            raise InvalidRequest(f"expected exactly one part named 'file', found {part.found}")
        pieces, part.pending = part.pending, []
        written += sum(len(p) for p in pieces)
        await _flush(fd, pieces, target)
        await trio.to_thread.run_sync(_finish_upload, fd, temp, target, old)
        renamed = True
    finally:
        os.close(fd)
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    await respond_json(send, 200, {"path": target, "size": written})


# ---- download ------------------------------------------------------------------------


def _open_for_download(path: str) -> tuple[int, os.stat_result, bytes]:
    """Open ``path``; returns (fd, its stat, its content when small enough for the ETag)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(exc, path, writing=False) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ReadError(f"{path}: is a directory")
        content = b""
        if stat.S_ISREG(info.st_mode) and info.st_size <= ETAG_CONTENT_LIMIT:
            content = os.pread(fd, info.st_size, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, info, content


async def download(scope: Scope, send: Send, home: str, *, head: bool) -> None:
    """Serve ``?path=``: whole, a Range of it, or 304 for a matching If-None-Match."""
    path = resolve_path(query_param(scope, "path"), home)
    fd, info, content = await trio.to_thread.run_sync(_open_for_download, path)
    try:
        size = info.st_size
        etag = make_etag(
            info.st_dev, info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns, content
        )
        headers = [
            ("etag", etag),
            ("last-modified", _http_date(info.st_mtime)),
            ("accept-ranges", "bytes"),
        ]
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if_none_match = header(scope, "if-none-match")
        if if_none_match is not None and etag_matches(if_none_match, etag):
            await respond(send, 304, content_type=None, headers=headers, content_length=0)
            return
        start, length, status = 0, size, 200
        requested = header(scope, "range")
        if_range = header(scope, "if-range")
        if requested is not None and (if_range is None or etag_matches(if_range, etag)):
            try:
                byte_range = parse_range(requested, size)
            except RangeNotSatisfiable as exc:
                await respond(
                    send,
                    416,
                    error_body("RangeNotSatisfiable", str(exc)),
                    headers=[("content-range", f"bytes */{size}")],
                )
                return
            if byte_range is not None:
                start, length, status = byte_range.start, byte_range.length, 206
                headers.append(("content-range", byte_range.content_range))
        start_event = {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in headers]
            + [
                (b"content-type", content_type.encode()),
                (b"content-length", b"%d" % length),
            ],
        }
        await send(start_event)
        if head:
            await send({"type": "http.response.body", "body": b""})
            return
        await _send_file(send, fd, start, length, content)
    finally:
        os.close(fd)


async def _send_file(send: Send, fd: int, start: int, length: int, content: bytes) -> None:
    if content or length == 0:
        await send({"type": "http.response.body", "body": content[start : start + length]})
        return
    offset, end = start, start + length
    while offset < end:
        chunk = await trio.to_thread.run_sync(os.pread, fd, min(IO_BATCH, end - offset), offset)
        if not chunk:
            break  # the file shrank under us; the client sees a short body
        offset += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": offset < end})
    if offset < end:
        await send({"type": "http.response.body", "body": b""})


def _http_date(seconds: float) -> str:
    """An HTTP date (RFC 9110 IMF-fixdate). (``email`` is imported on the first download,
    not on the path to serving: a live upgrade's new image waits for its imports.)"""
    import email.utils

    return email.utils.formatdate(seconds, usegmt=True)
