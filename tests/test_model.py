"""A model-based test of ``/execute/ws`` (issue 13): hypothesis drives one real daemon
process with random interleavings of what clients may do (``execute`` with random
options and frames before and right behind it, ``input`` at once or later,
``close_stdin``, ``signal``, ``kill``, ``resize``, more sockets attaching, sockets
dropping cleanly or by reset and reconnecting at their offsets, slow and paused readers),
and a model (tests/model/) says what every socket must see. See tests/model/machine.py
for the rules, state.py and checks.py for the invariants.

The daemon's ring is small (``RING``) so that output is evicted. ``MODEL_EXAMPLES`` and
``MODEL_STEPS`` set the budget (``make test``: 12 examples of up to 10 steps, derandomized
so that a failure reproduces; ``make soak``: more, with random seeds, and the blob to
reproduce a failure is printed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.model import observe
from tests.model.client import Mode, ModelSocket
from tests.model.driver import LONG_TTL
from tests.model.machine import USED, ExecModel
from tests.model.programs import Kind, Program
from tests.model.state import RING
from tests.sdk.conftest import DaemonProcess, daemon_process

EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("MODEL_STEPS", "10"))
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


def _opts(**changes: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ttl": LONG_TTL, "close_stdin": False, "early": 0, "early_close": False, "pipelined": 0,
        "trickle": False, "pad": 0, "mode": Mode.FAST, "then": None,
    }  # fmt: skip
    options.update(changes)
    return options


def _input_behind_execute(m: ExecModel) -> None:
    m._start(Program(Kind.ECHO, False, 3), **_opts(early=1, pipelined=6, then="close_stdin"))


def _input_behind_reconnect(m: ExecModel) -> None:
    m._start(Program(Kind.ECHO, False, 0), **_opts(pipelined=2))
    m.attach(
        pick=0, how="reconnect-0", close_first=False, pipelined=4, trickle=False, mode=Mode.FAST
    )
    m.close_stdin(pick=1, eot=False)


def _kill_behind_a_flood(m: ExecModel) -> None:
    m.start_sink(pty=False, flood="kill", **_opts())


def _paused_reader_of_a_large_output_with_ttl_0(m: ExecModel) -> None:
    m._start(Program(Kind.STREAM, False, 0, 7, 24000), **_opts(ttl=0, mode=Mode.PAUSED))
    m.idle(3.0)


#: Fixed sequences of the same rules, each run a few times (the first two are races):
#: what the random run may take long to stumble on, run by every ``make test``.
SCENARIOS = {
    "input-behind-execute": (_input_behind_execute, 6),
    "input-behind-reconnect": (_input_behind_reconnect, 6),
    "kill-behind-a-flood": (_kill_behind_a_flood, 1),
    "paused-reader-ttl-0": (_paused_reader_of_a_large_output_with_ttl_0, 1),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_known_scenario_meets_the_model(daemon: DaemonProcess, name: str) -> None:
    scenario, times = SCENARIOS[name]
    for _ in range(times):
        machine = ExecModel()
        scenario(machine)
        machine.every_frame_so_far_is_right()
        machine.teardown()


def test_the_model_left_no_session_behind(daemon: DaemonProcess) -> None:
    """Sessions with a TTL of 0 or 2 s are gone once it ran out; none is still running."""
    time.sleep(3.5)
    listed = observe.sessions(daemon.address)
    short = [i for i, ttl in USED if ttl < LONG_TTL and i in listed]
    assert short == [], [listed[i] for i in short[:3]]
    running = [i for i, _ in USED if i in listed and listed[i]["state"] == "running"]
    assert running == [], [listed[i] for i in running[:3]]
    assert observe.live_children(daemon.process.pid) == []
