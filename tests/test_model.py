"""A model-based test of ``/execute/ws`` (issue 13): hypothesis drives one real daemon
process with random interleavings of what clients may do (``execute`` with random
options and frames before and right behind it, ``input`` at once or later,
``close_stdin``, ``signal``, ``kill``, ``resize``, more sockets attaching, sockets
dropping cleanly or by reset and reconnecting at their offsets, slow and paused readers),
and a model (tests/model/) says what every socket must see. See tests/model/machine.py
for the rules, state.py and checks.py for the invariants.

The daemon's ring is small (``RING``) so that output is evicted. ``MODEL_EXAMPLES`` and
``MODEL_STEPS`` set the budget (``make test``: 25 examples of up to 12 steps, derandomized
so that a failure reproduces; ``make soak``: more, with random seeds, and the blob to
reproduce a failure is printed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.model import observe
from tests.model.client import ModelSocket
from tests.model.driver import LONG_TTL
from tests.model.machine import USED, ExecModel
from tests.model.state import RING
from tests.sdk.conftest import DaemonProcess, daemon_process

EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "18"))
STEPS = int(os.environ.get("MODEL_STEPS", "12"))
SOAK = "MODEL_EXAMPLES" in os.environ
#: ``MODEL_SHRINK=0``: report the first failing example as found, without shrinking it.
SHRINK = os.environ.get("MODEL_SHRINK", "1") != "0"

MODEL = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not SOAK,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
    phases=list(Phase) if SHRINK else [Phase.explicit, Phase.reuse, Phase.generate],
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with daemon_process(
        "--home", "/tmp", "--stop-grace", "1", "--ring-bytes", str(RING), "--stall-seconds", "2",
    ) as running:  # fmt: skip
        warm = ModelSocket(running.address, "warm-up")
        warm.send({"type": "execute", "command": "true", "close_stdin": True, "ttl_seconds": 0})
        assert warm.wait_for(lambda ws: ws.finished, 30)
        warm.close_clean()
        time.sleep(0.5)
        ExecModel.daemon = running
        ExecModel.fd_baseline = observe.fd_count(running.process.pid)
        yield running


def test_every_client_sees_what_the_model_predicts(daemon: DaemonProcess) -> None:
    started = time.monotonic()
    run_state_machine_as_test(ExecModel, settings=MODEL)
    print(
        f"model: {EXAMPLES} examples of up to {STEPS} steps in {time.monotonic() - started:.1f} s"
    )


def test_the_model_left_no_session_behind(daemon: DaemonProcess) -> None:
    """Sessions with a TTL of 0 or 2 s are gone once it ran out; none is still running."""
    time.sleep(3.5)
    listed = observe.sessions(daemon.address)
    short = [i for i, ttl in USED if ttl < LONG_TTL and i in listed]
    assert short == [], [listed[i] for i in short[:3]]
    running = [i for i, _ in USED if i in listed and listed[i]["state"] == "running"]
    assert running == [], [listed[i] for i in running[:3]]
    assert observe.live_children(daemon.process.pid) == []
