"""The CLI's reattach from offsets: a TCP proxy between the CLI and the daemon cuts the
connection again and again (clean closes and resets, as tests/test_chaos.py does) while
``sandboxd exec`` streams; the output must come out whole, nothing lost or repeated."""

from __future__ import annotations

import hashlib
import random
import subprocess

import trio

from tests.client.conftest import CLI, cli_env
from tests.sdk.conftest import daemon_process
from tests.test_chaos import RING, CuttingProxy, _expected

LINES = 2_000_000  # about 14.9 MB of `seq`: more than six cuts of at most 2 MiB each can take
CUTS = 6


async def test_a_cut_connection_during_exec_loses_and_duplicates_nothing() -> None:
    seed = random.randrange(1 << 32)
    size, digest = _expected(LINES)
    with daemon_process("--stop-grace", "1", "--ring-bytes", str(RING)) as daemon:
        host, port = daemon.address.rsplit(":", 1)
        proxy = CuttingProxy((host, int(port)), CUTS, random.Random(seed))
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve)
                done = await trio.to_thread.run_sync(
                    lambda: subprocess.run(
                        [*CLI, "exec", "--", "seq", "1", str(LINES)],
                        capture_output=True,
                        timeout=110,
                        env=cli_env(f"http://{proxy.address}"),
                    )
                )
                nursery.cancel_scope.cancel()
    assert len(proxy.done) == CUTS, f"seed {seed}: the stream ended before every cut"
    assert done.returncode == 0, done.stderr
    assert (len(done.stdout), hashlib.sha256(done.stdout).hexdigest()) == (size, digest), seed
