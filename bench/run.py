"""``make bench``: sandboxd and websocketd side by side on the same workloads.

    python bench/run.py [--quick] [--only NAME ...]

Prints a table of medians (min-max) and sandboxd/websocketd ratios, with the CPU the
servers and this client used, and writes the raw results to bench/results/<time>.json.
Every run verifies byte counts and sha256 against the command's real output. The
dataplane rows (bench/dataplane.py) have anchors of their own: nginx for /download and
/upload, a direct loopback TCP copy for /tunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import pty
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import dataplane
from clients import RunResult, sandboxd_run, slow_reader, websocketd_run
from pty_paths import read_to_end
from servers import Server, start_sandboxd, start_websocketd, websocketd_path

RESULTS = Path(__file__).parent / "results"


def expected(command: str) -> tuple[int, str]:
    """Byte count and sha256 of what ``command`` writes, run locally."""
    out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, check=True).stdout
    return len(out), hashlib.sha256(out).hexdigest()


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "n": len(ordered),
    }


def check(result: RunResult, want: tuple[int, str], who: str) -> None:
    if (result.nbytes, result.sha256) != want:
        raise AssertionError(
            f"{who}: got {result.nbytes} bytes sha {result.sha256[:12]}, "
            f"want {want[0]} bytes sha {want[1][:12]} (gaps {result.gaps})"
        )


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.results: dict[str, Any] = {}
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.have_websocketd = websocketd_path() is not None

    # -- helpers -----------------------------------------------------------------------

    async def measure(
        self, server: Server, runs: int, once: Callable[[], Awaitable[RunResult]]
    ) -> tuple[list[RunResult], dict[str, float]]:
        cpu0, client0 = server.cpu_seconds(), client_cpu()
        start = time.perf_counter()
        results = [await once() for _ in range(runs)]
        wall = time.perf_counter() - start
        return results, {
            "server_cpu_s": server.cpu_seconds() - cpu0,
            "client_cpu_s": client_cpu() - client0,
            "wall_s": wall,
        }

    def row(
        self,
        name: str,
        unit: str,
        ours: dict[str, float],
        theirs: dict[str, float] | None,
        better: str,
        key: str = "median",
        anchor: str = "",
    ) -> None:
        """A row; ``theirs`` is websocketd's unless ``anchor`` names what it is (or, with
        ``theirs`` None, why it is missing)."""

        def num(value: float) -> str:
            return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"

        def fmt(s: dict[str, float]) -> str:
            return f"{num(s[key])} ({num(s['min'])}-{num(s['max'])})"

        ratio = ""
        if theirs is not None:
            value = ours[key] / theirs[key] if theirs[key] else float("inf")
            ratio = f"{value:.2f}x ({better})"
        anchored = f"{fmt(theirs)} {anchor}".strip() if theirs else anchor or "-"
        self.rows.append((name, unit, fmt(ours), anchored, ratio))

    # -- workloads ---------------------------------------------------------------------

    async def both(
        self, sandboxd: Server, command: str, runs: int, *, lines: bool
    ) -> tuple[list[RunResult], dict[str, float], list[RunResult] | None, dict[str, float] | None]:
        """``runs`` verified runs of ``command`` on sandboxd, then on a websocketd started
        for it (binary frames, or a message per line with ``lines``) when installed."""
        want = expected(command)
        ours, ours_cpu = await self.measure(
            sandboxd, runs, lambda: sandboxd_run(sandboxd.port, command)
        )
        for r in ours:
            check(r, want, "sandboxd")
        if not self.have_websocketd:
            return ours, ours_cpu, None, None
        wsd = start_websocketd(command, binary=not lines)
        try:
            theirs, theirs_cpu = await self.measure(
                wsd, runs, lambda: websocketd_run(wsd.port, lines=lines)
            )
        finally:
            wsd.stop()
        for r in theirs:
            check(r, want, "websocketd")
        return ours, ours_cpu, theirs, theirs_cpu

    async def start_latency(self, sandboxd: Server) -> None:
        runs = 30 if self.quick else 300
        ours, ours_cpu, theirs, theirs_cpu = await self.both(
            sandboxd, "echo hello", runs, lines=True
        )
        ours_ms = summary([r.first_byte * 1000 for r in ours])
        entry: dict[str, Any] = {"sandboxd_ms": ours_ms, "sandboxd_cpu": ours_cpu}
        theirs_ms = None
        if theirs is not None:
            theirs_ms = summary([r.first_byte * 1000 for r in theirs])
            entry.update(websocketd_ms=theirs_ms, websocketd_cpu=theirs_cpu)
        self.results["start_latency"] = entry
        self.row("start latency p50", "ms", ours_ms, theirs_ms, "lower is better")
        self.row("start latency p99", "ms", ours_ms, theirs_ms, "lower is better", key="p99")

    async def cli_exec(self, sandboxd: Server) -> None:
        """Wall time of the real ``sandboxd exec -- true`` process, interpreter start
        included (the CLI's budget is 150 ms on loopback)."""
        script = Path(sys.executable).parent / "sandboxd"
        program = [str(script)] if script.exists() else [sys.executable, "-m", "sandboxd"]
        env = {**os.environ, "SANDBOXD_URL": f"http://127.0.0.1:{sandboxd.port}"}
        runs = 5 if self.quick else 20
        walls = await asyncio.to_thread(_time_runs, [*program, "exec", "--", "true"], env, runs)
        ms = summary(walls)
        self.results["cli_exec_true"] = {"wall_ms": ms}
        self.row("CLI `sandboxd exec -- true` wall", "ms", ms, None, "lower is better")

    async def throughput(self, sandboxd: Server, name: str, command: str, lines: bool) -> None:
        runs = 1 if self.quick else 3
        ours, ours_cpu, theirs, theirs_cpu = await self.both(sandboxd, command, runs, lines=lines)
        ours_mbs = summary([r.nbytes / r.elapsed / 1e6 for r in ours])
        entry: dict[str, Any] = {
            "bytes": ours[0].nbytes,
            "sandboxd_MBps": ours_mbs,
            "sandboxd_cpu": ours_cpu,
        }
        theirs_mbs = None
        if theirs is not None:
            theirs_mbs = summary([r.nbytes / r.elapsed / 1e6 for r in theirs])
            entry.update(websocketd_MBps=theirs_mbs, websocketd_cpu=theirs_cpu)
        self.results[name] = entry
        self.row(name, "MB/s", ours_mbs, theirs_mbs, "higher is better")

    async def concurrency(self, sandboxd: Server, clients: int) -> None:
        total = (100 if self.quick else 1000) if clients <= 10 else (200 if self.quick else 2000)
        command = "echo hello"
        want = expected(command)

        async def fleet(
            server: Server, run_one: Callable[[], Awaitable[RunResult]]
        ) -> tuple[float, list[float], int, float]:
            """Commands/s, latencies, failures, and the server's CPU ms per command
            (its own utime+stime; the commands' CPU is not in it)."""
            latencies: list[float] = []
            failures = 0
            remaining = total

            async def worker() -> None:
                nonlocal remaining, failures
                while remaining > 0:
                    remaining -= 1
                    try:
                        r = await run_one()
                        check(r, want, "client")
                        latencies.append(r.elapsed * 1000)
                    except Exception:
                        failures += 1

            cpu0 = server.cpu_seconds()
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            rate = total / (time.perf_counter() - start)
            return rate, latencies, failures, (server.cpu_seconds() - cpu0) * 1000 / total

        rate, lat, failed, cpu = await fleet(sandboxd, lambda: sandboxd_run(sandboxd.port, command))
        entry: dict[str, Any] = {
            "commands": total,
            "sandboxd_per_s": rate,
            "sandboxd_ms": summary(lat) if lat else None,
            "sandboxd_failures": failed,
            "sandboxd_cpu_ms_per_command": cpu,
        }
        ours = {"median": rate, "min": rate, "max": rate}
        ours_cpu = {"median": cpu, "min": cpu, "max": cpu}
        theirs = theirs_cpu = None
        if self.have_websocketd:
            wsd = start_websocketd(command, binary=False)
            try:
                w_rate, w_lat, w_failed, w_cpu = await fleet(
                    wsd, lambda: websocketd_run(wsd.port, lines=True)
                )
            finally:
                wsd.stop()
            entry.update(
                websocketd_per_s=w_rate,
                websocketd_ms=summary(w_lat) if w_lat else None,
                websocketd_failures=w_failed,
                websocketd_cpu_ms_per_command=w_cpu,
            )
            theirs = {"median": w_rate, "min": w_rate, "max": w_rate}
            theirs_cpu = {"median": w_cpu, "min": w_cpu, "max": w_cpu}
        self.results[f"concurrency_{clients}"] = entry
        self.row(
            f"{clients} clients: commands/s (failures {failed})",
            "cmd/s",
            ours,
            theirs,
            "higher is better",
        )
        if lat:
            p99 = summary(lat)
            theirs_p99 = summary(w_lat) if self.have_websocketd and w_lat else None
            self.row(
                f"{clients} clients: command p99",
                "ms",
                p99,
                theirs_p99,
                "lower is better",
                key="p99",
            )
        self.row(
            f"{clients} clients: server CPU per command",
            "ms",
            ours_cpu,
            theirs_cpu,
            "lower is better",
        )

    async def fan_out(self, sandboxd: Server, clients: int) -> None:
        size = 5_000_000 if self.quick else 50_000_000
        command = f"sleep 1; head -c {size * 3 // 4} /dev/zero | base64 -w 0"
        want = expected(command.removeprefix("sleep 1; "))
        command_id = uuid.uuid4().hex
        start = time.perf_counter()
        cpu0 = sandboxd.cpu_seconds()
        results = await asyncio.gather(
            *(sandboxd_run(sandboxd.port, command, command_id=command_id) for _ in range(clients))
        )
        wall = time.perf_counter() - start - 1.0
        lost = sum(1 for r in results if (r.nbytes, r.sha256) != want or r.gaps)
        aggregate = clients * size / wall / 1e6
        self.results[f"fan_out_{clients}"] = {
            "bytes_each": size,
            "clients_with_loss": lost,
            "aggregate_MBps": aggregate,
            "sandboxd_cpu_s": sandboxd.cpu_seconds() - cpu0,
        }
        stat = {"median": aggregate, "min": aggregate, "max": aggregate}
        self.row(
            f"fan-out {clients} x {size // 10**6} MB (clients with loss: {lost})",
            "MB/s total",
            stat,
            None,
            "",
        )
        if lost:
            raise AssertionError(f"fan-out to {clients}: {lost} clients lost output")

    async def slow_consumer(self, sandboxd: Server) -> None:
        """A fast client's throughput alone, then beside a client that reads 1 KB/s: on
        the same command, and on a command of its own (issue 6, item 8: >= 0.9x)."""
        size = 20_000_000 if self.quick else 100_000_000
        runs = 2 if self.quick else 9
        command = f"sleep 0.5; head -c {size * 3 // 4} /dev/zero | base64 -w 0"
        want = expected(command.removeprefix("sleep 0.5; "))

        async def fast(slow_on: str | None) -> RunResult:
            command_id = uuid.uuid4().hex
            stop = asyncio.Event()
            slow = None
            if slow_on is not None:
                slow_frame = {
                    "type": "execute",
                    "command": command if slow_on == "same" else "yes | head -c 1000000000",
                    "command_id": command_id if slow_on == "same" else uuid.uuid4().hex,
                    "close_stdin": True,
                    "timeout_seconds": 0,
                    "kill_on_disconnect": True,
                }
                slow = asyncio.create_task(slow_reader(sandboxd.port, slow_frame, 1024, stop))
                await asyncio.sleep(0.1)
            result = await sandboxd_run(sandboxd.port, command, command_id=command_id)
            stop.set()
            if slow is not None:
                result.extra["slow_read"] = await slow
            check(result, want, f"fast client (slow one on {slow_on})")
            return result

        # Interleaved, so that the machine's drift hits the three alike. Each rate is from
        # the fast client's first byte to its exit: the same span whoever started it.
        samples: dict[str | None, list[float]] = {None: [], "same": [], "other": []}
        for _ in range(runs):
            for slow_on, rates_of in samples.items():
                r = await fast(slow_on)
                rates_of.append(size / (r.elapsed - r.first_byte) / 1e6)
        rates = {slow_on: summary(values) for slow_on, values in samples.items()}
        solo = rates[None]
        self.results["slow_consumer"] = {
            "bytes": size,
            "solo_MBps": solo,
            "same_command_MBps": rates["same"],
            "other_command_MBps": rates["other"],
        }
        self.row("fast client alone", "MB/s", solo, None, "")
        for slow_on in ("same", "other"):
            ratio = rates[slow_on]["median"] / solo["median"]
            self.row(
                f"fast client, 1 KB/s client on the {slow_on} command ({ratio:.2f}x solo)",
                "MB/s",
                rates[slow_on],
                None,
                "",
            )

    async def pty_throughput(self, sandboxd: Server) -> None:
        size = 10_000_000 if self.quick else 100_000_000
        command = f"head -c {size * 3 // 4} /dev/zero | base64 -w 0"
        runs = 1 if self.quick else 3
        ours = [await sandboxd_run(sandboxd.port, command, pty=True) for _ in range(runs)]
        for r in ours:
            if r.nbytes != size:
                raise AssertionError(f"pty: got {r.nbytes} of {size} bytes")
        ours_mbs = summary([r.nbytes / r.elapsed / 1e6 for r in ours])
        plain = summary([_plain_pty_read(command, size) for _ in range(runs)])
        self.results["pty"] = {"sandboxd_MBps": ours_mbs, "plain_pty_read_MBps": plain}
        self.rows.append(
            (
                "PTY throughput (vs a plain PTY read)",
                "MB/s",
                f"{ours_mbs['median']:.3g} ({ours_mbs['min']:.3g}-{ours_mbs['max']:.3g})",
                f"{plain['median']:.3g} (plain read)",
                f"{ours_mbs['median'] / plain['median']:.2f}x (higher is better)",
            )
        )

    async def memory(self, sandboxd_args: list[str]) -> None:
        finished = 1000 if self.quick else 10_000
        running = 100 if self.quick else 1000
        server = start_sandboxd(*sandboxd_args)
        try:
            await sandboxd_run(server.port, "true")
            base = server.rss()
            sem = asyncio.Semaphore(50)

            async def small() -> None:
                async with sem:
                    r = await sandboxd_run(server.port, "echo hello")
                    assert r.nbytes == 6

            await asyncio.gather(*(small() for _ in range(finished)))
            after_finished = server.rss()
            per_finished = (after_finished - base) / finished

            async def sleeper() -> None:
                async with sem:
                    await _start_and_leave(server.port, "sleep 600")

            await asyncio.gather(*(sleeper() for _ in range(running)))
            await asyncio.sleep(1)
            per_running = (server.rss() - after_finished) / running
        finally:
            server.stop()
        self.results["memory"] = {
            "finished_sessions": finished,
            "bytes_per_finished_session": per_finished,
            "running_sessions": running,
            "bytes_per_running_session": per_running,
        }
        for label, value, n in (
            ("finished", per_finished, finished),
            ("running", per_running, running),
        ):
            stat = {"median": value / 1024, "min": value / 1024, "max": value / 1024}
            self.row(f"RSS per {label} session ({n})", "KiB", stat, None, "")

    async def replay(self, sandboxd: Server) -> None:
        size = 8 * 1024 * 1024
        command = f"head -c {size * 3 // 4} /dev/zero | base64 -w 0"
        want = expected(command)
        command_id = uuid.uuid4().hex
        first = await sandboxd_run(sandboxd.port, command, command_id=command_id)
        check(first, want, "sandboxd")
        runs = 3 if self.quick else 10
        replays = [
            await sandboxd_run(sandboxd.port, "", command_id=command_id, reconnect=(0, 0))
            for _ in range(runs)
        ]
        for r in replays:
            check(r, want, "replay")
        ttfb = summary([r.first_byte * 1000 for r in replays])
        total = summary([r.elapsed * 1000 for r in replays])
        self.results["replay_8MiB"] = {"first_byte_ms": ttfb, "complete_ms": total}
        self.row("replay 8 MiB: first byte", "ms", ttfb, None, "")
        self.row("replay 8 MiB: complete", "ms", total, None, "")

    async def upgrade(self, sandboxd_args: list[str]) -> None:
        """Live upgrades under ten attached clients (bench/upgrade.py says what is measured)."""
        from upgrade import run_upgrades

        server = start_sandboxd(*sandboxd_args)
        try:
            found = await run_upgrades(server.port, server.process.pid, 5 if self.quick else 50)
        finally:
            server.stop()
        self.results["upgrade"] = found
        if found["refused"] or found["lost_or_duplicated"] or found["cut_requests"]:
            raise AssertionError(f"upgrade: {found}")
        n = found["upgrades"]
        for label, values in (
            ("trigger -> new image accepting", found["accept_ms"]),
            ("stream gap, client side", found["gap_ms"]),
            ("swap_ms the daemon reports", found["swap_ms"]),
        ):
            stat = summary(values)
            self.row(f"upgrade ({n}): {label} p50", "ms", stat, None, "")
            self.row(f"upgrade ({n}): {label} p99", "ms", stat, None, "", key="p99")
        zero = {"median": 0.0, "min": 0.0, "max": 0.0}
        self.row(f"upgrade ({n}): refused of {found['connects']} connects: 0", "", zero, None, "")
        self.row(f"upgrade ({n}): lost or duplicated bytes: 0", "", zero, None, "")
        self.row(f"upgrade ({n}): /healthz polls cut by a swap: 0", "", zero, None, "")

    # -- report ------------------------------------------------------------------------

    def report(self) -> str:
        header = ("workload", "unit", "sandboxd median (min-max)", "websocketd or named", "ratio")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(5)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
        lines.append("-|-".join("-" * w for w in widths))
        for row in self.rows:
            lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        return "\n".join(lines)


async def _start_and_leave(port: int, command: str) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/execute/ws", compression=None) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "execute",
                    "command": command,
                    "close_stdin": True,
                    "timeout_seconds": 0,
                    "idle_timeout_seconds": -1,
                }
            )
        )
        started = json.loads(await ws.recv())
        assert started["type"] == "started", started


def _time_runs(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall milliseconds of ``runs`` runs of ``argv``, each of which must exit 0."""
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, check=False)
        walls.append((time.perf_counter() - start) * 1000)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}")
    return walls


def _plain_pty_read(command: str, size: int) -> float:
    """MB/s of reading ``command``'s output straight from a PTY master in Python."""
    master, slave = pty.openpty()
    start = time.perf_counter()
    child = subprocess.Popen(["/bin/sh", "-c", command], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    received = read_to_end(master)
    elapsed = time.perf_counter() - start
    os.close(master)
    child.wait()
    if received != size:
        raise AssertionError(f"plain pty read {received} of {size}")
    return received / elapsed / 1e6


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: the smoke version")
    parser.add_argument("--only", nargs="*", default=None, help="run only these workloads")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    bench = Bench(args.quick)
    sandboxd_args = ["--stop-grace", "1"]
    sandboxd = start_sandboxd(*sandboxd_args)
    steps: dict[str, Callable[[], Awaitable[None]]] = {
        "latency": lambda: bench.start_latency(sandboxd),
        "cli": lambda: bench.cli_exec(sandboxd),
        "throughput": lambda: bench.throughput(
            sandboxd,
            "throughput",
            f"head -c {20_000_000 if args.quick else 200_000_000} /dev/zero | base64 -w 0",
            False,
        ),
        "lines": lambda: bench.throughput(
            sandboxd,
            "lines_76",
            f"head -c {1_500_000 if args.quick else 15_000_000} /dev/zero | base64 -w 76",
            True,
        ),
        "concurrency": lambda: _both(
            bench.concurrency(sandboxd, 10), bench.concurrency(sandboxd, 100)
        ),
        "fanout": lambda: _both(bench.fan_out(sandboxd, 10), bench.fan_out(sandboxd, 100)),
        "pty": lambda: bench.pty_throughput(sandboxd),
        "slow_consumer": lambda: bench.slow_consumer(sandboxd),
        "memory": lambda: bench.memory(sandboxd_args),
        "replay": lambda: bench.replay(sandboxd),
        "sdk_files": lambda: dataplane.sdk_files(bench, sandboxd),
        "files": lambda: dataplane.files(bench, sandboxd),
        "tunnel": lambda: dataplane.tunnel(bench, sandboxd),
        "upgrade": lambda: bench.upgrade(sandboxd_args),
    }
    try:
        for name, step in steps.items():
            if args.only is None or name in args.only:
                print(f"... {name}", file=sys.stderr, flush=True)
                await step()
    finally:
        sandboxd.stop()
    failed = bool(sandboxd.logs)
    if failed:
        print("sandboxd logged errors:\n" + "".join(sandboxd.logs[:3]), file=sys.stderr)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"\nsandboxd vs websocketd — {machine}"
        + ("" if bench.have_websocketd else " (websocketd not installed: sandboxd only)")
    )
    print(bench.report())
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.json"
        out.write_text(
            json.dumps(
                {"machine": machine, "quick": args.quick, "results": bench.results}, indent=2
            )
        )
        print(f"\nraw results: {out}")
    return 1 if failed else 0


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    await first
    await second


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
