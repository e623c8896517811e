"""Decoding and validating client frames."""

from __future__ import annotations

import json

import pytest

from sandboxd.core.errors import InvalidRequest
from sandboxd.core.messages import (
    CloseStdin,
    Execute,
    Gap,
    Input,
    Kill,
    Reconnect,
    Resize,
    Signal,
    decode_client,
    encode_text,
    read_only_refusal,
    validate_execute,
)


def test_the_sdk_execute_frame_decodes_with_every_field() -> None:
    frame = (
        '{"type":"execute","command":"echo","timeout_seconds":60,"shell":"/bin/bash",'
        '"idle_timeout_seconds":300,"kill_on_disconnect":false,"ttl_seconds":600,'
        '"command_id":"01a21fd33dc175dc915c8efde3805c5c","close_stdin":true}'
    )
    msg = decode_client(frame)
    assert isinstance(msg, Execute)
    assert msg.command_id == "01a21fd33dc175dc915c8efde3805c5c" and msg.close_stdin is True


def test_a_bare_execute_gets_the_sdk_defaults() -> None:
    msg = decode_client('{"type":"execute","command":"x"}')
    assert msg == Execute(command="x")
    assert (msg.timeout_seconds, msg.idle_timeout_seconds, msg.ttl_seconds) == (60, 300, 600)
    assert msg.close_stdin is False  # a missing close_stdin keeps stdin open


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode_client('{"type":"close_stdin","future":1}') == CloseStdin()


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ("not json", "malformed"),
        ('{"type":"launch"}', "Invalid value 'launch'"),
        ('{"command":"x"}', "missing required field `type`"),
        ('{"type":"execute","command":1}', "Expected `str`, got `int` - at `$.command`"),
        ('{"type":"reconnect","command_id":"a","stdout_offset":-1}', "Expected `int` >= 0"),
        ('{"type":"resize","cols":0,"rows":10}', "Expected `int` >= 1"),
        ("[1,2]", "Expected `object`"),
    ],
)
def test_bad_frames_say_what_is_wrong_and_where(frame: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        decode_client(frame)
    assert says in error.value.message


def test_signal_and_reconnect_frames() -> None:
    assert decode_client('{"type":"signal","signal":"INT"}') == Signal(signal="INT")
    assert decode_client('{"type":"resize","cols":80,"rows":24}') == Resize(cols=80, rows=24)
    assert decode_client('{"type":"reconnect","command_id":"c"}') == Reconnect(command_id="c")


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"run_config": {"env_vars": {}}, "env": {"A": "1"}}, "cannot be combined"),
        ({"run_config": {"work_dir": "rel"}}, "absolute"),
        ({"cwd": "rel"}, "absolute"),
        ({"timeout_seconds": -1}, "timeout_seconds"),
        ({"idle_timeout_seconds": -2}, "idle_timeout_seconds"),
        ({"ttl_seconds": -2}, "ttl_seconds"),
        ({"command_id": "has space"}, "command_id"),
        ({"command_id": "x" * 129}, "command_id"),
        ({"command": "a\0b"}, "NUL"),
    ],
)
def test_contradictory_executes_are_refused(fields: dict[str, object], says: str) -> None:
    settings: dict[str, object] = {"command": "x"}
    settings.update(fields)
    msg = decode_client(json.dumps({"type": "execute", **settings}))
    assert isinstance(msg, Execute)
    with pytest.raises(InvalidRequest, match=says):
        validate_execute(msg)


def test_the_gap_frame_names_its_range_with_from_and_to() -> None:
    assert encode_text(Gap(stream="stdout", from_=3, to=9)) == (
        '{"type":"gap","stream":"stdout","from":3,"to":9}'
    )


def test_reconnect_takes_the_watch_extension_which_defaults_to_false() -> None:
    frame = '{"type":"reconnect","command_id":"c","watch":true}'
    assert decode_client(frame) == Reconnect(command_id="c", watch=True)
    assert decode_client('{"type":"reconnect","command_id":"c"}').watch is False  # type: ignore[union-attr]


def test_a_watcher_may_signal_and_kill_but_not_write() -> None:
    for allowed in (Kill(), Signal(signal="INT")):
        assert read_only_refusal(allowed) is None
    for refused, name in (
        (Input(data="x"), "input"),
        (CloseStdin(), "close_stdin"),
        (Resize(cols=80, rows=24), "resize"),
    ):
        error = read_only_refusal(refused)
        assert error is not None and error.error_type == "InvalidRequest"
        assert error.error.startswith("read-only attachment: ") and name in error.error


def test_execute_takes_the_window_size_extension_within_bounds() -> None:
    msg = decode_client('{"type":"execute","command":"x","pty":true,"cols":132,"rows":43}')
    assert isinstance(msg, Execute) and (msg.cols, msg.rows) == (132, 43)
    bare = decode_client('{"type":"execute","command":"x"}')
    assert isinstance(bare, Execute) and (bare.cols, bare.rows) == (None, None)
    with pytest.raises(InvalidRequest, match="cols"):
        decode_client('{"type":"execute","command":"x","cols":0}')
