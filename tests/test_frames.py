"""Unit tests of dicomfs.frames (no FUSE, no network).

Every image in pydicom's bundled test data is cut, and the frames are compared byte for byte with
what pydicom itself extracts from the same file, computed here without using dicomfs.frames.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import DecodeRunner

from dicomfs import frames
from dicomfs.errors import ProtocolError
from dicomfs.multipart import (
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_from_content_type,
)
from dicomfs.records import FrameTable
from tests.cod_writer import frame_table
from tests.factory import slide

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
EXPLICIT_LE = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
NATIVE = {"1.2.840.10008.1.2", EXPLICIT_LE, BIG_ENDIAN, "1.2.840.10008.1.2.1.99"}

# Files pydicom reads whose pixel data pydicom cannot turn into frames either: cut_frames refuses.
BROKEN = {
    "MR_truncated.dcm": "8130 bytes",  # 8130 bytes of a 64x64 16-bit frame
    "badVR.dcm": "NumberOfFrames",  # NumberOfFrames "1A"
    "meta_missing_tsyntax.dcm": "transfer syntax",
    "nested_priv_SQ.dcm": "Rows",  # a 2-byte PixelData without any image attributes
}
# Explicit VR Big Endian files -> their little endian twins, which hold the same pixels.
BIG_ENDIAN_TWINS = {
    "MR_small_bigendian.dcm": "MR_small.dcm",
    "MR_small_expb.dcm": "MR_small.dcm",
    "rtdose_expb.dcm": "rtdose.dcm",
    "rtdose_expb_1frame.dcm": "rtdose_1frame.dcm",
    "liver_expb_1frame.dcm": "liver_1frame.dcm",
    "SC_rgb_small_odd_big_endian.dcm": "SC_rgb_small_odd.dcm",
}
REQUIRED = {
    "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "CT_small.dcm", "JPEG2000.dcm",
    "JPEG-lossy.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle.dcm", "SC_rgb_small_odd.dcm", "image_dfl.dcm", "SC_rgb_jls_lossy_line.dcm",
    "examples_ybr_color.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_16bit_2frame.dcm", "examples_jpeg2k.dcm",
    # multi-frame native, big endian multi-frame, YBR_FULL_422 native, packed bits
    "rtdose_expb.dcm", "SC_ybr_full_422_uncompressed.dcm", "liver_1frame.dcm",
}
MEDIA_TYPES = {
    "1.2.840.10008.1.2": "application/octet-stream",
    "1.2.840.10008.1.2.1": "application/octet-stream",
    "1.2.840.10008.1.2.2": "application/octet-stream",
    "1.2.840.10008.1.2.1.99": "application/octet-stream",
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.100.1": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.101.1": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.102.1": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106.1": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
    "1.2.3.4.5": "application/octet-stream",
}


def read(path: Path | str | BinaryIO) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=False)


def _image_files() -> list[Path]:
    """Every bundled test file that pydicom reads (force=False) and that has pixel data."""
    found = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            ds = read(path)
        except Exception:
            continue
        if any(tag in ds for tag in PIXEL_TAGS):
            found.append(path)
    return found


IMAGES = _image_files()
CUTTABLE = [path for path in IMAGES if path.name not in BROKEN]


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in pydicom's bundled test data"
    return Path(path)


def ident(path: Path) -> str:
    return str(path.relative_to(bundled("MR_small.dcm").parent))


def pixel_value(ds: Dataset) -> bytes:
    value: bytes = next(ds[tag].value for tag in PIXEL_TAGS if tag in ds)
    return value


def reference(path: Path) -> tuple[str, list[bytes]]:
    """(transfer syntax, frames) as pydicom extracts them from ``path``, without dicomfs."""
    ds = read(path)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax not in NATIVE:
        offsets = None
        if "ExtendedOffsetTable" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        count = int(ds.get("NumberOfFrames") or 1)
        found = generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=offsets)
        return syntax, list(found)
    if path.name in BIG_ENDIAN_TWINS:
        return reference(bundled(BIG_ENDIAN_TWINS[path.name]))
    if syntax == BIG_ENDIAN:
        # pydicom hands out big endian OB values as they are (its swaps are for OW only).
        assert next(ds[tag] for tag in PIXEL_TAGS if tag in ds).VR == "OB"
    runner = DecodeRunner(ds.file_meta.TransferSyntaxUID)
    runner.set_source(ds)
    length, count = runner.frame_length(unit="bytes"), runner.number_of_frames
    assert isinstance(length, int)
    value = pixel_value(ds)
    return EXPLICIT_LE, [value[i * length : (i + 1) * length] for i in range(count)]



def streamed(p10: bytes) -> frames.Frames:
    """The frames at the ranges ``locate_in_file`` finds, or, where it finds none (data not stored
    as served), ``cut_frames``'s: as the server and the mount serve an instance too large to cut whole."""
    located = frames.locate_in_file(BytesIO(p10), lambda offset, size: p10[offset:offset + size])
    if located is None:
        return frames.cut_frames(p10)
    return frames.Frames(located.transfer_syntax,
                         [b"".join(p10[offset:offset + size] for offset, size in pieces) for pieces in located.pieces])


@pytest.fixture(params=["whole", "streamed"])
def cut(request: pytest.FixtureRequest) -> Callable[[bytes], frames.Frames]:
    """Both ways dicomfs finds an instance's frames: cut from its bytes in memory, or located in
    its file without holding it (``locate_in_file``, for instances larger than ``STREAM_CUT``)."""
    return frames.cut_frames if request.param == "whole" else streamed


def test_the_required_files_are_covered() -> None:
    assert REQUIRED <= {path.name for path in CUTTABLE}
    assert set(BIG_ENDIAN_TWINS) <= {path.name for path in CUTTABLE}
    assert set(BROKEN) <= {path.name for path in IMAGES}


@pytest.mark.parametrize("path", CUTTABLE, ids=ident)
def test_frames_match_pydicom(path: Path, cut: Callable[[bytes], frames.Frames]) -> None:
    found = cut(path.read_bytes())
    syntax, expected = reference(path)
    assert found.transfer_syntax == syntax
    assert len(found.frames) == len(expected) >= 1
    for number, (frame, want) in enumerate(zip(found.frames, expected, strict=False), start=1):
        assert isinstance(frame, bytes)
        assert frame == want, f"frame {number} differs"


@pytest.mark.parametrize("path", CUTTABLE, ids=ident)
def test_frames_are_located_in_the_file_unless_stored_otherwise(path: Path) -> None:
    """``locate_in_file`` finds where every frame lies except in big endian and deflated data
    (served converted, so cut whole), reading no more than a frame's bytes from the file at once."""
    p10 = path.read_bytes()
    reads: list[int] = []

    def read_at(offset: int, size: int) -> bytes:
        reads.append(size)
        return p10[offset:offset + size]

    located = frames.locate_in_file(BytesIO(p10), read_at)
    syntax = str(read(path).file_meta.TransferSyntaxUID)
    assert (located is None) == (syntax in (BIG_ENDIAN, "1.2.840.10008.1.2.1.99"))
    if located is not None:
        expected = reference(path)[1]
        assert [b"".join(p10[o:o + n] for o, n in pieces) for pieces in located.pieces] == expected
        assert max(reads, default=0) <= max(map(len, expected))  # (no more than a frame at once)


@pytest.mark.parametrize("name", sorted(BIG_ENDIAN_TWINS))
def test_big_endian_twins_hold_the_same_pixels_in_another_order(name: str) -> None:
    """Guards the reference: the big endian file's bytes are not already the expected frames."""
    ds = read(bundled(name))
    _, expected = reference(bundled(BIG_ENDIAN_TWINS[name]))
    raw, twin = pixel_value(ds), pixel_value(read(bundled(BIG_ENDIAN_TWINS[name])))
    assert sorted(raw) == sorted(twin)
    if ds["PixelData"].VR == "OB":
        assert raw.startswith(b"".join(expected))
    else:
        assert not raw.startswith(b"".join(expected))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_files_pydicom_cannot_cut_are_refused(name: str, cut: Callable[[bytes], frames.Frames]) -> None:
    with pytest.raises(ProtocolError, match=BROKEN[name]) as caught:
        cut(bundled(name).read_bytes())
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("path", CUTTABLE, ids=ident)
def test_media_type_of_each_file(path: Path) -> None:
    syntax = str(read(path).file_meta.TransferSyntaxUID)
    assert frames.media_type(syntax) == MEDIA_TYPES[syntax]
    assert frames.is_native(syntax) == (syntax in NATIVE)


@pytest.mark.parametrize(("syntax", "media"), sorted(MEDIA_TYPES.items()))
def test_media_type(syntax: str, media: str) -> None:
    assert frames.media_type(syntax) == media


@pytest.mark.parametrize(
    "path", [p for p in CUTTABLE if str(read(p).file_meta.TransferSyntaxUID) in NATIVE],
    ids=ident,
)
def test_native_frame_length_from_dicom_json(path: Path) -> None:
    cut = frames.cut_frames(path.read_bytes())
    attrs = read(path).group_dataset(0x0028).to_json_dict()
    assert frames.native_frame_length(attrs) == len(cut.frames[0])


def us(value: object) -> dict[str, object]:
    return {"vr": "US", "Value": [value]}


def test_native_frame_length_rules() -> None:
    base = {"00280010": us(512), "00280011": us(256), "00280100": us(16)}
    assert frames.native_frame_length(base) == 512 * 256 * 2
    assert frames.native_frame_length({**base, "00280002": us(3)}) == 512 * 256 * 2 * 3
    ybr = {**base, "00280002": us(3), "00280004": {"vr": "CS", "Value": ["YBR_FULL_422"]}}
    assert frames.native_frame_length(ybr) == 512 * 256 * 2 * 2
    assert frames.native_frame_length({**base, "00280100": us(1)}) == 512 * 256 // 8
    odd_bits = {"00280010": us(3), "00280011": us(3), "00280100": us(1)}
    assert frames.native_frame_length(odd_bits) is None
    for key in ("00280010", "00280011", "00280100"):
        assert frames.native_frame_length({k: v for k, v in base.items() if k != key}) is None
        for bad in (0, -1, "512", True, None, 1.5):
            assert frames.native_frame_length({**base, key: us(bad)}) is None
        assert frames.native_frame_length({**base, key: {"vr": "US"}}) is None
        assert frames.native_frame_length({**base, key: {"vr": "US", "Value": []}}) is None
    assert frames.native_frame_length({**base, "00280002": {"vr": "US"}}) is None


def test_frame_file_exact_bytes() -> None:
    boundary = frames.BOUNDARY.encode()
    body = frames.frame_file(b"AB", "1.2.840.10008.1.2.4.50")
    assert body == (
        b"--" + boundary + b"\r\n"
        b"Content-Type: image/jpeg;transfer-syntax=1.2.840.10008.1.2.4.50\r\n"
        b"\r\n"
        b"AB\r\n"
        b"--" + boundary + b"--\r\n"
    )
    assert frames.CONTENT_TYPE == (
        'multipart/related; type="application/octet-stream"; boundary=' + frames.BOUNDARY
    )
    assert boundary_from_content_type(frames.CONTENT_TYPE) == boundary
    assert len(frames.BOUNDARY) >= 24


TRICKY = (
    b"\r\n--" + frames.BOUNDARY[:-1].encode() + b"\r\n\r\n--" + frames.BOUNDARY[:10].encode()
    + bytes(range(256)) + b"--\r\n"
)


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"])
def test_frame_file_round_trip(syntax: str) -> None:
    body = frames.frame_file(TRICKY, syntax)
    opening = b"--" + frames.BOUNDARY.encode() + b"\r\n"
    assert body.startswith(opening)
    header, _, rest = body[len(opening) :].partition(b"\r\n\r\n")
    assert header == f"Content-Type: {MEDIA_TYPES[syntax]};transfer-syntax={syntax}".encode()
    content, delimiter, tail = rest.partition(b"\r\n--" + frames.BOUNDARY.encode())
    assert delimiter and tail == b"--\r\n"
    assert content == TRICKY
    assert frames.frame_file(memoryview(TRICKY), syntax) == body


def test_frame_file_parses_with_the_multipart_parser() -> None:
    body = frames.frame_file(TRICKY, EXPLICIT_LE)
    parser = MultipartParser(boundary_from_content_type(frames.CONTENT_TYPE))
    events = []
    for start in range(0, len(body), 7):
        events += parser.feed(body[start : start + 7])
    parser.close()
    assert isinstance(events[0], PartStart) and isinstance(events[-1], PartEnd)
    assert events[0].headers == {
        "content-type": f"application/octet-stream;transfer-syntax={EXPLICIT_LE}"
    }
    data = b"".join(bytes(e.data) for e in events if isinstance(e, PartData))
    assert data == TRICKY
    assert sum(isinstance(e, PartStart) for e in events) == 1


def test_frame_file_parses_with_dicomweb_client() -> None:
    from dicomweb_client import web  # a test dependency (pyproject [test]): missing means failing

    class Response:  # the part of requests.Response that the decoder touches
        headers = {"content-type": frames.CONTENT_TYPE}
        content = frames.frame_file(TRICKY, "1.2.840.10008.1.2.4.50")

        def __enter__(self) -> Response:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    client = web.DICOMwebClient.__new__(web.DICOMwebClient)
    # a stand-in with only the parts of requests.Response that the decoder touches
    assert list(client._decode_multipart_message(Response(), stream=False)) == [TRICKY]  # type: ignore[arg-type]


@pytest.mark.parametrize("syntax", sorted(MEDIA_TYPES))
@pytest.mark.parametrize("length", [0, 1, 2, 27, 8192])
def test_frame_file_size(syntax: str, length: int) -> None:
    assert frames.frame_file_size(length, syntax) == len(frames.frame_file(b"x" * length, syntax))


def test_frame_file_refuses_a_syntax_that_is_not_a_uid() -> None:
    with pytest.raises(ProtocolError):
        frames.frame_file(b"x", "1.2.840.10008.1.2.1\r\nX-Injected: 1")
    with pytest.raises(ProtocolError):
        frames.frame_file_size(1, "")


def to_bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out)
    return out.getvalue()


def with_extended_offsets(order: list[int]) -> tuple[bytes, list[bytes]]:
    """examples_ybr_color.dcm re-encapsulated with an empty BOT and an Extended Offset Table,
    the fragments stored in ``order``; returns the file and the frames in frame order."""
    ds = read(bundled("examples_ybr_color.dcm"))
    source = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert all(len(frame) % 2 == 0 for frame in source)
    items = [b"\xfe\xff\x00\xe0" + struct.pack("<I", len(frame)) + frame for frame in source]
    offsets, position = [0] * len(source), 0
    for index in order:
        offsets[index] = position
        position += len(items[index])
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"".join(items[i] for i in order)
    ds["PixelData"].is_undefined_length = True
    ds.ExtendedOffsetTable = struct.pack(f"<{len(source)}Q", *offsets)
    ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(source)}Q", *map(len, source))
    return to_bytes(ds), source


def test_extended_offset_table(cut: Callable[[bytes], frames.Frames]) -> None:
    p10, source = with_extended_offsets(list(range(30)))
    found = cut(p10)
    assert found.transfer_syntax == "1.2.840.10008.1.2.4.50"
    assert found.frames == source
    written = read(BytesIO(p10))
    assert "ExtendedOffsetTable" in written
    assert len(found.frames) == 30


def test_extended_offset_table_decides_the_frame_order(cut: Callable[[bytes], frames.Frames]) -> None:
    p10, source = with_extended_offsets(list(reversed(range(30))))
    assert cut(p10).frames == source
    # Without the table the fragments would come out in stored (reversed) order.
    stored = read(BytesIO(p10)).PixelData
    assert list(generate_frames(stored, number_of_frames=30)) == source[::-1]


@pytest.mark.parametrize(
    ("keyword", "index", "delta", "message"),
    [
        ("ExtendedOffsetTable", 1, 4, "points outside"),  # into frame 2's data, still in range
        ("ExtendedOffsetTable", 29, 10**6, "points outside"),  # past the end
        ("ExtendedOffsetTableLengths", 29, 2, "runs past"),  # the last frame is 2 bytes short
    ],
)
def test_a_wrong_extended_offset_table_is_refused(
    keyword: str, index: int, delta: int, message: str, cut: Callable[[bytes], frames.Frames]
) -> None:
    p10, _ = with_extended_offsets(list(range(30)))
    ds = read(BytesIO(p10))
    table = list(struct.unpack("<30Q", ds[keyword].value))
    table[index] += delta
    ds[keyword].value = struct.pack("<30Q", *table)
    with pytest.raises(ProtocolError, match=message):
        cut(to_bytes(ds))


@pytest.mark.parametrize("data", [b"", b"hello", b"\0" * 132, b"\0" * 128 + b"DICM" + b"\xff" * 40])
def test_not_dicom_is_refused(data: bytes, cut: Callable[[bytes], frames.Frames]) -> None:
    with pytest.raises(ProtocolError) as caught:
        cut(data)
    assert str(caught.value) and "\n" not in str(caught.value)


def test_a_truncated_file_is_refused(cut: Callable[[bytes], frames.Frames]) -> None:
    p10 = bundled("MR_small.dcm").read_bytes()  # pixel data is followed by trailing padding
    pixels = p10.index(b"\xe0\x7f\x10\x00OW") + 12
    for size in (140, len(p10) // 2, pixels, pixels + 8191):
        with pytest.raises(ProtocolError) as caught:
            cut(p10[:size])
        assert "\n" not in str(caught.value)


def test_no_pixel_data_is_refused(cut: Callable[[bytes], frames.Frames]) -> None:
    with pytest.raises(ProtocolError, match="without pixel data") as caught:
        cut(bundled("rtplan.dcm").read_bytes())
    assert "\n" not in str(caught.value)


def test_native_data_cut_short_is_refused(cut: Callable[[bytes], frames.Frames]) -> None:
    ds = read(bundled("MR_small.dcm"))
    ds.NumberOfFrames = 2  # 8192 bytes hold one 64x64 16-bit frame, not two
    with pytest.raises(ProtocolError, match="8192 bytes, 2 frame") as caught:
        cut(to_bytes(ds))
    assert "\n" not in str(caught.value)


def test_trailing_padding_is_ignored(cut: Callable[[bytes], frames.Frames]) -> None:
    padded = cut(bundled("MR_small_padded.dcm").read_bytes())
    plain = cut(bundled("MR_small.dcm").read_bytes())
    assert padded.frames == plain.frames


def test_packed_bits_that_are_not_whole_bytes_are_refused(cut: Callable[[bytes], frames.Frames]) -> None:
    ds = read(bundled("liver_1frame.dcm"))
    ds.Rows, ds.Columns = 3, 3  # 9 bits per frame
    with pytest.raises(ProtocolError, match="not whole bytes"):
        cut(to_bytes(ds))


def test_encapsulated_frame_count_must_match(cut: Callable[[bytes], frames.Frames]) -> None:
    ds = read(bundled("SC_rgb_rle_2frame.dcm"))
    ds.NumberOfFrames = 3
    with pytest.raises(ProtocolError, match="frames"):
        cut(to_bytes(ds))


def test_is_native() -> None:
    for syntax in NATIVE:
        assert frames.is_native(syntax)
    for syntax in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1.98"):
        assert not frames.is_native(syntax)
    assert frames.EXPLICIT_VR_LITTLE_ENDIAN == EXPLICIT_LE


@pytest.mark.mount  # (a process of its own: a clean interpreter)
def test_the_mount_and_the_server_start_without_pydicom() -> None:
    """pydicom (with numpy and requests) is imported when a frame is first cut, not when the mount
    or the server starts: importing it there took 0.25 s of every start and 20 MiB of every
    daemon that never cuts a frame."""
    import subprocess
    import sys

    code = ("import sys, dicomfs.mount, dicomfs.commands.mount, dicomfs.server.app, dicomfs.commands.serve; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydicom', 'numpy')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_frame_count_beyond_what_dicomfs_serves_is_refused(cut: Callable[[bytes], frames.Frames]) -> None:
    """A hostile or broken NumberOfFrames (frames of a byte each: 30 MB of pixel data made 30
    million objects in memory) is one line, not the daemon's memory."""
    ds = read(bundled("liver_1frame.dcm"))
    ds.Rows = ds.Columns = 8  # 8 bytes a frame of packed bits
    ds.NumberOfFrames = frames.MAX_FRAME_COUNT + 1
    ds.PixelData = bytes(8 * (frames.MAX_FRAME_COUNT + 1))
    with pytest.raises(ProtocolError, match="more than dicomfs serves") as caught:
        cut(to_bytes(ds))
    assert "\n" not in str(caught.value)


def test_more_fragments_than_dicomfs_walks_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encapsulated pixel data of millions of tiny items is refused by the file's walk, before
    any of them is kept (``MAX_FRAGMENTS``, made small here)."""
    p10, source = with_extended_offsets(list(range(30)))
    monkeypatch.setattr(frames, "MAX_FRAGMENTS", 10)
    with pytest.raises(ProtocolError, match="more than 10 fragments"):
        frames.locate_in_file(BytesIO(p10), lambda offset, size: p10[offset:offset + size])
    monkeypatch.setattr(frames, "MAX_FRAGMENTS", 30)
    assert streamed(p10).frames == source


@pytest.mark.parametrize("order", ["stored", "reversed"])
def test_frame_ranges_are_the_pieces_of_each_frame(order: str) -> None:
    p10, source = with_extended_offsets(list(range(30)) if order == "stored" else list(reversed(range(30))))
    located = frames.locate_in_file(BytesIO(p10), lambda offset, size: p10[offset:offset + size])
    assert located is not None and len(located.pieces) == 30
    for index, pieces in enumerate(located.pieces):
        assert len(pieces) == 1 and pieces == located.pieces[index]
        assert located.pieces.frame_length(index) == len(source[index])
        assert b"".join(p10[o:o + n] for o, n in pieces) == source[index]
    with pytest.raises(IndexError):
        located.pieces[30]


def test_fragments_stored_out_of_frame_order_are_located_by_their_table() -> None:
    """An extended offset table may put frames in any order: each frame is the range it gives,
    in its order (a slide of that kind is not cut whole in memory)."""
    p10, source = with_extended_offsets(list(reversed(range(30))))
    located = frames.locate_in_file(BytesIO(p10), lambda offset, size: p10[offset:offset + size])
    assert located is not None and len(located.pieces) == 30
    assert [b"".join(p10[o:o + n] for o, n in pieces) for pieces in located.pieces] == source
    assert streamed(p10).frames == source


@pytest.mark.parametrize("name", ["SC_rgb_rle_2frame.dcm", "MR_small.dcm"])
def test_a_file_shorter_than_its_index_says_so(tmp_path: Path, name: str) -> None:
    """A cached or local file cut short after it was indexed is that (IntegrityError, the file's
    fault), not malformed data from the archive (ProtocolError)."""
    from dicomfs import dicomjson
    from dicomfs.dicomread import RangeFile
    from dicomfs.errors import IntegrityError

    p10 = bundled(name).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(p10[:len(p10) // 2])
    fd = os.open(path, os.O_RDONLY)
    try:
        file = RangeFile(fd, 0, len(p10), shorter=lambda: IntegrityError("shorter than when it was indexed"))
        with pytest.raises(IntegrityError):
            frames.locate_in_file(file, file.read_at)
        file.seek(0)
        with pytest.raises(IntegrityError):
            dicomjson.bulk_value(file, "7FE00010", file.read_at)
    finally:
        os.close(fd)


# --- an archive's offset table, checked before frames are read alone ----------------------------------
def claimed(p10: bytes, table: dict[str, list[int]] | None = None) -> tuple[bytes, bytes, FrameTable]:
    """What ``check_frame_table`` is handed for ``p10`` and a COD offset table (by default the
    right one): the bytes before the first frame, the 8 after the last, the table."""
    table = table or frame_table(p10)
    claim = FrameTable(tuple(table["CustomOffsetTable"]), tuple(table["CustomOffsetTableLengths"]), len(p10))
    end = claim.offsets[-1] + claim.lengths[-1]
    return p10[:claim.offsets[0]], p10[end:end + 8], claim


def frames_in_items(p10: bytes, claim: FrameTable) -> list[bytes]:
    found = []
    for index, (offset, length) in enumerate(zip(claim.offsets, claim.lengths, strict=True)):
        following = claim.lengths[index + 1] if index + 1 < len(claim.lengths) else None
        found.append(bytes(frames.frame_in_item(p10[offset - 8:offset + length + 8], length, following)))
    return found


@pytest.mark.parametrize("form", ["basic offset table", "extended offset table"])
def test_a_frame_table_that_holds_gives_pydicoms_frames(form: str) -> None:
    if form == "extended offset table":
        p10, _ = with_extended_offsets(list(range(30)))
    else:
        p10 = slide("1.2.3", "1.2.3.4", encapsulated=True, frames=12, frame_bytes=1024, number=1)
    syntax, reference = frames_of(p10)
    prefix, delimiter, claim = claimed(p10)
    assert frames.check_frame_table(prefix, delimiter, claim) == syntax
    assert frames_in_items(p10, claim) == reference


def frames_of(p10: bytes) -> tuple[str, list[bytes]]:
    ds = read(BytesIO(p10))
    return str(ds.file_meta.TransferSyntaxUID), list(generate_frames(ds.PixelData,
                                                                     number_of_frames=int(ds.NumberOfFrames)))


Table = dict[str, list[int]]  # a COD offset table


def with_table(change: Callable[[Table], object]) -> Callable[[bytes], tuple[bytes, Table]]:
    def make(p10: bytes) -> tuple[bytes, Table]:
        table = frame_table(p10)
        change(table)
        return p10, table
    return make


def wrong_basic_offset(p10: bytes) -> tuple[bytes, dict[str, list[int]]]:
    table = frame_table(p10)
    at = p10.rfind(b"\xe0\x7f\x10\x00") + 20 + 4  # the second frame's entry
    return p10[:at] + struct.pack("<I", struct.unpack_from("<I", p10, at)[0] + 2) + p10[at + 4:], table


def reordered(p10: bytes) -> tuple[bytes, dict[str, list[int]]]:
    p10, _ = with_extended_offsets([1, 0, *range(2, 30)])
    return p10, frame_table(p10)  # (stored order: not the table's)


@pytest.mark.parametrize("make, message", [
    (with_table(lambda t: t.update(CustomOffsetTable=[o + 8 for o in t["CustomOffsetTable"]])),
     "not the first item after the basic offset table"),
    (with_table(lambda t: [t[k].pop() for k in t]), "lists 11 frames, NumberOfFrames is 12"),
    (with_table(lambda t: t["CustomOffsetTableLengths"].__setitem__(3, t["CustomOffsetTableLengths"][3] - 2)),
     "frame 5 does not follow frame 4"),
    (with_table(lambda t: t["CustomOffsetTableLengths"].__setitem__(0, t["CustomOffsetTableLengths"][0] + 1)),
     "not the first item"),
    (with_table(lambda t: t["CustomOffsetTableLengths"].__setitem__(1, 7)), "does not follow"),
    (with_table(lambda t: t["CustomOffsetTableLengths"].__setitem__(5, 1 << 32)), "longer than an item can be"),
    (wrong_basic_offset, "the basic offset table places the frames elsewhere"),
    (reordered, "the extended offset table places the frames elsewhere"),
    (lambda p10: (slide("1.2.3", "1.2.3.4", encapsulated=True, frames=12, frame_bytes=1024, number=1, has_bot=False),
                  None), "no offset table of its own"),
    (lambda p10: (p10 + b"\xfc\xff\xfc\xff\x00\x00\x00\x00", frame_table(p10)), "and of the file"),
])
def test_a_frame_table_that_does_not_hold_is_refused(
        make: Callable[[bytes], tuple[bytes, Table | None]], message: str) -> None:
    p10, table = make(slide("1.2.3", "1.2.3.4", encapsulated=True, frames=12, frame_bytes=1024, number=1))
    with pytest.raises(ProtocolError, match=message):
        frames.check_frame_table(*claimed(p10, table))


def test_a_frame_table_is_refused_for_native_data_or_without_the_pixel_datas_end() -> None:
    native = slide("1.2.3", "1.2.3.4", encapsulated=False, frames=4, frame_bytes=1024, number=1)
    with pytest.raises(ProtocolError, match="not encapsulated"):
        frames.check_frame_table(*claimed(native))
    p10 = slide("1.2.3", "1.2.3.4", encapsulated=True, frames=4, frame_bytes=1024, number=1)
    prefix, _, claim = claimed(p10)
    for delimiter in (b"", b"\xfe\xff\x00\xe0\x00\x00\x00\x00"):
        with pytest.raises(ProtocolError, match="not followed by the end of the pixel data"):
            frames.check_frame_table(prefix, delimiter, claim)
    with pytest.raises(ProtocolError, match="not the length of its lengths"):
        frames.check_frame_table(prefix[:-1], b"", claim)


def test_a_frame_read_alone_must_be_the_item_the_table_says() -> None:
    p10 = slide("1.2.3", "1.2.3.4", encapsulated=True, frames=4, frame_bytes=1024, number=1)
    _, _, claim = claimed(p10)
    offset, length, following = claim.offsets[1], claim.lengths[1], claim.lengths[2]
    data = p10[offset - 8:offset + length + 8]
    assert bytes(frames.frame_in_item(data, length, following)) == frames_of(p10)[1][1]
    for wrong in ((data, length - 2, following), (data, length, following + 2), (data, length, None),
                  (data[:-1], length, following), (b"\0" * 8 + data[8:], length, following)):
        with pytest.raises(ProtocolError):
            frames.frame_in_item(*wrong)


@pytest.mark.parametrize("form", ["basic offset table", "extended offset table", "none", "native", "split frame"])
def test_an_instances_own_frame_table(form: str) -> None:
    """``own_frame_table`` (an IDC object's frames, from its own offset table read up to the first
    frame): the COD writer's table where there is one, accepted by ``check_frame_table``; None
    without one; a frame of two fragments taken as one item, refused when that frame is read."""
    if form == "extended offset table":
        p10, _ = with_extended_offsets(list(range(30)))
    else:
        p10 = slide("1.2.3", "1.2.3.4", encapsulated=form != "native", frames=12, frame_bytes=1024, number=1,
                    has_bot=form != "none", split=(3,) if form == "split frame" else ())
    own = frames.own_frame_table(BytesIO(p10), len(p10))
    if form in ("none", "native"):
        assert own is None
        return
    assert own is not None
    prefix, delimiter, claim = claimed(p10, {"CustomOffsetTable": list(own.offsets),
                                             "CustomOffsetTableLengths": list(own.lengths)})
    assert frames.check_frame_table(prefix, delimiter, claim) == frames_of(p10)[0]
    if form == "split frame":
        with pytest.raises(ProtocolError):  # (at frame 2: the item after it is not the length the table says)
            frames_in_items(p10, claim)
    else:
        assert claim == claimed(p10)[2]  # the COD writer's table
        assert frames_in_items(p10, claim) == frames_of(p10)[1]
