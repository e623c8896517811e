"""Where a PTY's throughput goes: three ways of reading one command's output, no daemon.

    python bench/pty_paths.py [--mb 100] [--runs 3]

Each run starts ``head -c N /dev/zero | base64 -w 0`` on a fresh PTY and reads it to the
end in one of three ways, interleaved so that a busy machine hurts all of them alike:

* ``plain``: blocking 64 KiB reads of the master, nothing else (the benchmark's anchor);
* ``framed``: what sandboxd does on its one thread: non-blocking reads until the master is
  empty or 256 KiB are in, then the batch JSON-encoded as an output frame and written to a
  1 MiB pipe that a ``cat`` drains into /dev/null, then the next read;
* ``relayed``: the same framed loop, reading a 1 MiB pipe that a ``cat`` fills from the
  master (a relay process; the reading of 4 KiB pieces moves off the framing thread).

It prints MB/s, the reader's own CPU per MB, and for ``relayed`` the relay's CPU per MB.
The point it makes (docs/performance.md, "PTY"): the kernel hands out 4,095 bytes per
read of a master and the writer stops once ~68 KB wait in the PTY, so any work done on
the reading thread between reads adds to the time per MB; a relay takes it off.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import resource
import select
import statistics
import subprocess
import time

import msgspec

BATCH = 256 * 1024
_F_SETPIPE_SZ = 1031
_encode = msgspec.json.Encoder().encode


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    """utime + stime of a live process, in seconds (from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_to_end(master: int) -> int:
    """Bytes read from a PTY master by blocking 64 KiB reads until EOF or EIO: the plain
    reader that bench/run.py's PTY row is measured against."""
    received = 0
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every holder of the slave closed it
            break
        if not chunk:
            break
        received += len(chunk)
    return received


def _framed_loop(fd: int, sink: int) -> int:
    """Read ``fd`` to EOF/EIO as sandboxd's pump and connection do, on one thread."""
    os.set_blocking(fd, False)
    received = offset = 0
    parts: list[bytes] = []
    pending = 0
    ended = False
    while not ended:
        try:
            piece = os.read(fd, BATCH - pending)
        except BlockingIOError:
            piece = None
        except OSError:  # EIO: a PTY master whose slave is gone
            piece, ended = b"", True
        if piece == b"":
            ended = True
        elif piece is not None:
            parts.append(piece)
            pending += len(piece)
        if parts and (piece is None or pending >= BATCH or ended):
            data = b"".join(parts)
            frame = _encode({"type": "stdout", "data": data.decode(), "offset": offset})
            view = memoryview(frame)
            while view:
                view = view[os.write(sink, view) :]
            offset += len(data)
            received += len(data)
            parts, pending = [], 0
        if piece is None and not ended:
            select.select([fd], [], [])
    return received


def run(mode: str, size: int) -> tuple[float, float, float]:
    """(MB/s, reader CPU ms per MB, relay CPU ms per MB) of one run."""
    master, slave = pty.openpty()
    command = f"head -c {size * 3 // 4} /dev/zero | base64 -w 0"
    cpu0 = _cpu_self()
    start = time.perf_counter()
    child = subprocess.Popen(["/bin/sh", "-c", command], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    relay = drain = None
    relay_cpu = 0.0
    try:
        if mode == "plain":
            received = read_to_end(master)
        else:
            drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            assert drain.stdin is not None
            fcntl.fcntl(drain.stdin.fileno(), _F_SETPIPE_SZ, 1 << 20)
            source = master
            if mode == "relayed":
                read_end, write_end = os.pipe()
                fcntl.fcntl(read_end, _F_SETPIPE_SZ, 1 << 20)
                relay = subprocess.Popen(
                    ["cat"], stdin=master, stdout=write_end, stderr=subprocess.DEVNULL
                )
                os.close(write_end)
                source = read_end
            received = _framed_loop(source, drain.stdin.fileno())
            if relay is not None:
                relay_cpu = _cpu_of(relay.pid)
                os.close(source)
    finally:
        elapsed = time.perf_counter() - start
        cpu = _cpu_self() - cpu0
        os.close(master)
        child.wait()
        for proc in (relay, drain):
            if proc is not None:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait()
    if received != size:
        raise AssertionError(f"{mode}: {received} of {size} bytes")
    mb = size / 1e6
    return mb / elapsed, cpu * 1000 / mb, relay_cpu * 1000 / mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="output per run, MB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    modes = ("plain", "framed", "relayed")
    results: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in modes}
    for _ in range(args.runs):
        for mode in modes:
            results[mode].append(run(mode, args.mb * 1_000_000))
    plain = statistics.median(r[0] for r in results["plain"])
    for mode in modes:
        rate = statistics.median(r[0] for r in results[mode])
        cpu = statistics.median(r[1] for r in results[mode])
        relay = statistics.median(r[2] for r in results[mode])
        extra = f", relay {relay:.1f} ms/MB" if mode == "relayed" else ""
        ratio = rate / plain
        print(f"{mode:8} {rate:6.1f} MB/s ({ratio:.2f}x plain), reader {cpu:.1f} ms/MB{extra}")


if __name__ == "__main__":
    main()
