"""Unit tests of the incremental multipart parser (no I/O)."""

from __future__ import annotations

import os

import pytest

from dicomfs.errors import ProtocolError
from dicomfs.multipart import MultipartParser, PartData, PartEnd, PartStart, boundary_from_content_type

BOUNDARY = b"b0undary-42"


def build(parts: list[bytes], *, lengths: bool, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = bytearray(preamble)
    for body in parts:
        out += b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n"
        if lengths:
            out += b"Content-Length: %d\r\n" % len(body)
        out += b"\r\n" + body + b"\r\n"
    out += b"--" + BOUNDARY + b"--\r\n" + epilogue
    return bytes(out)


def parse(body: bytes, pieces: list[int] | None = None) -> list[bytes]:
    parser = MultipartParser(BOUNDARY)
    results: list[bytes] = []
    current: bytearray | None = None
    cuts = [0, *(pieces or []), len(body)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        for event in parser.feed(body[start:end]):
            if isinstance(event, PartStart):
                assert current is None
                current = bytearray()
            elif isinstance(event, PartData):
                assert current is not None
                current += event.data
            else:
                assert isinstance(event, PartEnd) and current is not None
                results.append(bytes(current))
                current = None
    parser.close()
    return results


# Bodies that contain near-misses of the delimiter, CRLFs and dashes.
PARTS = [
    b"DICM" + os.urandom(300),
    b"\r\n--b0undary-4\r\n--b0undary\r\n-- \r\n" + b"x" * 50,
    b"",
    b"--" + BOUNDARY[:-1] + b"\r\n\r\n",
]


@pytest.mark.parametrize("lengths", [True, False])
def test_whole_body(lengths: bool) -> None:
    assert parse(build(PARTS, lengths=lengths, preamble=b"ignored preamble\r\n", epilogue=b"junk")) == PARTS


@pytest.mark.parametrize("lengths", [True, False])
def test_split_at_every_byte_boundary(lengths: bool) -> None:
    body = build(PARTS, lengths=lengths)
    for cut in range(1, len(body)):
        assert parse(body, [cut]) == PARTS, cut


@pytest.mark.parametrize("lengths", [True, False])
def test_fed_one_byte_at_a_time(lengths: bool) -> None:
    body = build(PARTS, lengths=lengths)
    assert parse(body, list(range(1, len(body)))) == PARTS


@pytest.mark.parametrize("lengths", [True, False])
def test_truncated_bodies_are_rejected(lengths: bool) -> None:
    body = build(PARTS, lengths=lengths)
    closing = len(body) - len(b"--" + BOUNDARY + b"--\r\n")
    for cut in range(closing + 3):
        with pytest.raises(ProtocolError):
            parse(body[:cut])


def test_part_longer_than_its_content_length_is_rejected() -> None:
    body = (b"--" + BOUNDARY + b"\r\nContent-Length: 4\r\n\r\n" + b"12345678" + b"\r\n--" + BOUNDARY + b"--")
    with pytest.raises(ProtocolError, match="longer than its Content-Length"):
        parse(body)


def test_invalid_content_length_is_rejected() -> None:
    body = b"--" + BOUNDARY + b"\r\nContent-Length: -5\r\n\r\nabc\r\n--" + BOUNDARY + b"--"
    with pytest.raises(ProtocolError):
        parse(body)


def test_huge_headers_are_rejected() -> None:
    body = b"--" + BOUNDARY + b"\r\nX: " + b"a" * 100_000
    with pytest.raises(ProtocolError, match="too long"):
        parse(body)


def test_large_body_in_small_pieces() -> None:
    """Megabytes without per-part lengths, fed in 4 KiB pieces."""
    big = os.urandom(4 << 20)
    body = build([big, big[:1000]], lengths=False)
    pieces = list(range(4096, len(body), 4096))
    assert parse(body, pieces) == [big, big[:1000]]


def test_boundary_from_content_type() -> None:
    assert boundary_from_content_type(
        'multipart/related; type="application/dicom"; boundary="abc def"') == b"abc def"
    assert boundary_from_content_type("multipart/related;boundary=xyz") == b"xyz"
    with pytest.raises(ProtocolError):
        boundary_from_content_type("application/json")
    with pytest.raises(ProtocolError):
        boundary_from_content_type("multipart/related; type=application/dicom")


@pytest.mark.parametrize("lengths", [True, False])
@pytest.mark.parametrize("piece", [1 << 20, 70_000, 65_536 + 7, 333])
def test_many_large_parts_in_pieces_around_the_buffer_window(lengths: bool, piece: int) -> None:
    """Parts of 200 kB fed in pieces larger and smaller than the 64 KiB boundary window."""
    parts = [os.urandom(200_000 + n) for n in range(5)] + [b"", b"tail"]
    body = build(parts, lengths=lengths)
    assert parse(body, list(range(piece, len(body), piece))) == parts


def test_sized_part_bodies_are_views_of_the_input() -> None:
    part = os.urandom(500_000)
    body = build([part, part], lengths=True)
    data = [e.data for e in MultipartParser(BOUNDARY).feed(body) if isinstance(e, PartData)]
    copied = sum(len(d) for d in data if not isinstance(d, memoryview))
    assert copied < 2 * 65_536  # only what passed through the window around each boundary
    assert b"".join(data) == part + part
