"""The incremental UTF-8 sanitiser."""

from __future__ import annotations

import random

from sandboxd.core.utf8 import Utf8Sanitizer


def feed_all(pieces: list[bytes]) -> bytes:
    sanitizer = Utf8Sanitizer()
    return b"".join(sanitizer.feed(p) for p in pieces) + sanitizer.finish()


def test_ascii_passes_through_untouched() -> None:
    assert feed_all([b"hello ", b"world\n"]) == b"hello world\n"


def test_a_character_split_across_reads_is_held_back_then_completed() -> None:
    sanitizer = Utf8Sanitizer()
    euro = "€".encode()
    assert sanitizer.feed(b"a" + euro[:1]) == b"a"
    assert sanitizer.feed(euro[1:2]) == b""
    assert sanitizer.feed(euro[2:] + b"b") == euro + b"b"
    assert sanitizer.finish() == b""


def test_invalid_bytes_become_replacement_characters() -> None:
    assert feed_all([b"a\xff\xfeb"]).decode() == "a\ufffd\ufffdb"


def test_an_incomplete_character_at_the_end_becomes_one_replacement() -> None:
    assert feed_all([b"x\xe2\x82"]).decode() == "x\ufffd"


def test_encoded_surrogates_are_not_passed_on() -> None:
    out = feed_all([b"\xed\xa0\x80"])
    out.decode()  # valid UTF-8, strictly
    assert "\ufffd" in out.decode()


def test_any_split_of_any_bytes_gives_valid_utf8_equal_to_a_one_shot_decode() -> None:
    rng = random.Random(7)
    alphabet = ["a", "é", "€", "😀"]
    for _ in range(300):
        raw = bytearray("".join(rng.choice(alphabet) for _ in range(40)).encode())
        for _ in range(rng.randrange(3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        cuts = sorted(rng.sample(range(1, len(raw)), 5))
        pieces = [bytes(raw[a:b]) for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        out = feed_all(pieces)
        assert out == bytes(raw).decode("utf-8", "replace").encode()
