"""Bounded decoding of what an archive sends: compressed bodies never inflate past their limit,
and malformed or absurdly nested JSON is one ProtocolError."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable

import pytest

from dicomfs.decoding import BoundedDecoder, inflate_gzip, parse_json
from dicomfs.errors import ProtocolError

BOMB = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KB


def test_a_gzip_bomb_is_refused_at_the_limit_without_inflating_it() -> None:
    assert len(BOMB) < 100_000
    decoder = BoundedDecoder("gzip", 1 << 20, "the answer")
    produced = 0
    with pytest.raises(ProtocolError, match="larger than 1048576 bytes once inflated"):
        for start in range(0, len(BOMB), 16384):
            for piece in decoder.feed(BOMB[start:start + 16384]):
                assert len(piece) <= 1 << 20  # never more than one step at a time
                produced += len(piece)
    assert produced <= 1 << 20
    with pytest.raises(ProtocolError, match="once inflated"):
        inflate_gzip(BOMB, 1 << 20, "metadata.json")


@pytest.mark.parametrize("coding, compress", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),  # zlib-wrapped, as the RFC says
    ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw, as some servers send it
    ("identity", lambda data: data),
    (None, lambda data: data),
])
def test_accepted_codings_decode_exactly(coding: str | None, compress: Callable[[bytes], bytes]) -> None:
    body = json.dumps([{"k": i} for i in range(10_000)]).encode()
    decoder = BoundedDecoder(coding, len(body), "the answer")
    raw = compress(body)
    out = b"".join(bytes(p) for start in range(0, len(raw), 1000) for p in decoder.feed(raw[start:start + 1000]))
    decoder.finish()
    assert out == body
    with pytest.raises(ProtocolError, match="larger than"):
        small = BoundedDecoder(coding, len(body) - 1, "the answer")
        for start in range(0, len(raw), 1000):
            small.feed(raw[start:start + 1000])


def test_unasked_codings_and_broken_streams_are_refused() -> None:
    with pytest.raises(ProtocolError, match="'br', which dicomfs did not ask for"):
        BoundedDecoder("br", 100, "the answer")
    with pytest.raises(ProtocolError, match="not validly compressed"):
        BoundedDecoder("gzip", 100, "the answer").feed(b"\x1f\x8b not gzip at all")
    truncated = BoundedDecoder("gzip", 1 << 20, "the answer")
    truncated.feed(gzip.compress(b"x" * 1000)[:-10])
    with pytest.raises(ProtocolError, match="ends inside"):
        truncated.finish()


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                  b"{not json", b"\xff\xfe", "[" * 5000])
def test_malformed_and_deeply_nested_json_is_a_protocol_error(body: bytes | str) -> None:
    with pytest.raises(ProtocolError, match="malformed JSON from the archive") as info:
        parse_json(body, "the archive")
    assert "\n" not in str(info.value)


def test_good_json_parses() -> None:
    assert parse_json(bytearray(b'[{"a": NaN}]'), "x")[0]["a"] != 0  # NaN as archives send it
    assert parse_json(memoryview(b"[1]"), "x") == [1]
