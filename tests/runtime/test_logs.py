"""JSON log lines: held on the event loop's thread until the loop waits for I/O."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
import trio

from sandboxd.runtime import logs
from sandboxd.runtime.logs import FlushBeforeWait, JsonFormatter, JsonLineHandler


class Recording(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, JsonLineHandler, Recording]]:
    stream = Recording()
    handler = JsonLineHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, handler, stream
    logger.removeHandler(handler)


def lines(stream: Recording) -> list[dict[str, object]]:
    return [json.loads(line) for line in "".join(stream.writes).splitlines()]


def test_lines_outside_a_loop_are_written_at_once(
    logged: tuple[logging.Logger, JsonLineHandler, Recording],
) -> None:
    logger, _, stream = logged
    logger.info("one", extra={"n": 1})
    assert [line["msg"] for line in lines(stream)] == ["one"]
    assert lines(stream)[0]["n"] == 1


def test_loop_lines_wait_for_the_io_wait_then_go_in_one_write(
    logged: tuple[logging.Logger, JsonLineHandler, Recording],
) -> None:
    logger, handler, stream = logged
    seen_before_wait: list[int] = []

    async def main() -> None:
        with trio.fail_after(10):
            for n in range(3):
                logger.info("line", extra={"n": n})
            seen_before_wait.append(len(stream.writes))  # none yet: the loop has not waited
            await trio.sleep(0.01)  # the loop waits for I/O: the held lines go out
            seen_before_wait.append(len(stream.writes))
            logger.info("last")  # held at the end of the run: after_run writes it

    trio.run(main, instruments=[FlushBeforeWait(handler)])
    assert seen_before_wait == [0, 1]
    assert [(line["msg"], line.get("n")) for line in lines(stream)] == [
        ("line", 0),
        ("line", 1),
        ("line", 2),
        ("last", None),
    ]
    assert handler.hold_on is None  # after the run, lines are written at once again
    logger.info("after")
    assert lines(stream)[-1]["msg"] == "after"


def test_lines_from_another_thread_are_not_held(
    logged: tuple[logging.Logger, JsonLineHandler, Recording],
) -> None:
    logger, handler, stream = logged
    written: list[int] = []

    async def main() -> None:
        with trio.fail_after(10):
            thread = threading.Thread(target=logger.info, args=("from a thread",))
            thread.start()
            await trio.to_thread.run_sync(thread.join)
            written.append(len(stream.writes))

    trio.run(main, instruments=[FlushBeforeWait(handler)])
    assert written == [1]


def test_flush_writes_what_is_held(
    logged: tuple[logging.Logger, JsonLineHandler, Recording],
) -> None:
    logger, handler, stream = logged
    handler.hold_on = threading.get_ident()
    logger.info("held")
    assert stream.writes == []
    handler.flush()  # what logging.shutdown does at exit
    assert [line["msg"] for line in lines(stream)] == ["held"]


def test_the_timestamp_is_rfc3339_utc_with_milliseconds(
    logged: tuple[logging.Logger, JsonLineHandler, Recording],
) -> None:
    logger, _, stream = logged
    record = logging.LogRecord("x", logging.INFO, "", 0, "m", (), None)
    record.created, record.msecs = 86400.0 + 1.25, 250.0
    assert json.loads(JsonFormatter().format(record))["ts"] == "1970-01-02T00:00:01.250Z"
    logger.info("now")
    assert str(lines(stream)[0]["ts"]).endswith("Z")


def test_a_busy_loop_holds_its_lines_for_at_most_hold_seconds(
    logged: tuple[logging.Logger, JsonLineHandler, Recording], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, handler, stream = logged
    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    instrument = FlushBeforeWait(handler)
    handler.hold_on = threading.get_ident()
    logger.info("one")
    now[0] += logs.HOLD_SECONDS / 2
    logger.info("two")
    instrument.before_io_wait(0)  # tasks are runnable: the loop only polls
    assert stream.writes == []
    now[0] += logs.HOLD_SECONDS / 2  # the oldest line has waited long enough
    instrument.before_io_wait(0)
    assert [line["msg"] for line in lines(stream)] == ["one", "two"]
    logger.info("three")
    instrument.before_io_wait(0.5)  # the loop is about to sleep: written at once
    assert [line["msg"] for line in lines(stream)] == ["one", "two", "three"]
    assert len(stream.writes) == 2
