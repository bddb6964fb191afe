"""The Part 10 check against pydicom's own test files, in every chunking, and against broken ones."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pydicom
import pytest

from dicomfs.errors import ProtocolError
from dicomfs.p10 import parse_file_meta
from dicomfs.p10check import Part10Check
from dicomfs.uids import instance_key
from tests.factory import make_instance

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
# Every Part 10 file of pydicom's test set that is complete: all syntaxes, sequences of undefined
# length, UN sequences, encapsulated pixel data, deflated data sets, files that declare explicit VR
# and are implicit, files whose file meta names another SOPInstanceUID than their data set.
WELL_FORMED = sorted(
    p.name for p in TEST_FILES.glob("*.dcm")
    if p.read_bytes()[128:132] == b"DICM" and p.name not in ("MR_truncated.dcm", "rtplan_truncated.dcm"))


KEPT = (0x00080016, 0x00200013)  # SOPClassUID, InstanceNumber (what the IDC source keeps)


def check(data: bytes, step: int | None = None, keep: tuple[int, ...] = ()) -> Part10Check:
    checker = Part10Check(keep)
    step = step or len(data) or 1
    for start in range(0, len(data), step):
        checker.feed(data[start:start + step])
    checker.finish()
    return checker


@pytest.mark.parametrize("name", WELL_FORMED)
def test_every_well_formed_test_file_passes_in_any_chunking(name: str) -> None:
    assert len(WELL_FORMED) > 60
    data = (TEST_FILES / name).read_bytes()
    whole = check(data, keep=KEPT)
    for step in (1, 3, 8, 13, 4096):
        chunked = check(data, step, KEPT)
        assert (chunked.dataset_uid, chunked.values) == (whole.dataset_uid, whole.values)
    ds = pydicom.dcmread(TEST_FILES / name, force=True)
    # the values kept are the top-level elements' own bytes, as pydicom finds them (short ones)
    raw = {tag: ds.get_item(tag) for tag in (0x00080018, *KEPT)}
    assert whole.values == {tag: bytes(element.value or b"") for tag, element in raw.items()
                            if element is not None and len(element.value or b"") <= 128}
    expected = ds.get("SOPInstanceUID")
    assert whole.dataset_uid == (str(expected).rstrip("\0 ") if expected is not None else None)


def test_the_data_set_uid_wins_over_the_file_meta() -> None:
    data = (TEST_FILES / "rtdose.dcm").read_bytes()
    checker = check(data)
    assert checker.meta is not None
    assert checker.meta.sop_instance_uid == "1.2.999.999.99.9.9999.9999.20030818153516"
    assert checker.dataset_uid == "1.9.999.999.99.9.9999.9999.20030818153516"
    assert instance_key(checker.dataset_uid, checker.meta.sop_instance_uid) == checker.dataset_uid
    assert instance_key(None, checker.meta.sop_instance_uid) == checker.meta.sop_instance_uid
    assert instance_key("../x", "1.2/3") is None


def test_identified_early_without_the_rest_of_the_file() -> None:
    data = make_instance("1.2", "1.2.3", "1.2.3.4", pixel_bytes=1_000_000)
    checker = Part10Check()
    checker.feed(data[:2000])
    assert checker.identified and checker.dataset_uid == "1.2.3.4"


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_truncated_files_fail(name: str) -> None:
    with pytest.raises(ProtocolError, match="short"):
        check((TEST_FILES / name).read_bytes())


def broken_variants() -> dict[str, bytes]:
    good = make_instance("1.2", "1.2.3", "1.2.3.4", pixel_bytes=400)
    meta_end = parse_file_meta(good).end
    encapsulated = (TEST_FILES / "JPEG2000.dcm").read_bytes()
    deflated = (TEST_FILES / "image_dfl.dcm").read_bytes()
    return {
        "cut inside a value": good[:-10],
        "cut inside a header": good[:meta_end + 5],
        "one byte too many": good + b"\0",
        "a stray element after the end": good + b"\x08\x00\x20\x00DA\x08\x0020240101" + b"\x00" * 3,
        "zeros instead of a data set": good[:meta_end] + b"\0" * 1000,
        "random bytes instead of a data set": good[:meta_end] + bytes((i * 37) % 251 for i in range(5000)),
        "no preamble": good[128:],
        "only a preamble": good[:132],
        "a gzip bomb's zeros": b"\0" * 100_000,
        "encapsulated pixel data without its end": encapsulated[:-8],
        "a deflated data set cut short": deflated[:-50],
        "garbage after a deflated data set": deflated + b"garbage!!",
        "a wrong gzip trailer": deflated[:-8] + struct.pack("<II", 0, 0),
        "a lying sequence length": _with_bad_item(),
        "sequences nested without end": good[:meta_end] + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" * 2 + (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
                                                     + b"\xfe\xff\x00\xe0\xff\xff\xff\xff") * 100,
    }


def _with_bad_item() -> bytes:
    """A real file with sequences of undefined length, its first item delimiter damaged."""
    raw = (TEST_FILES / "liver_1frame.dcm").read_bytes()
    position = raw.index(b"\xfe\xff\x0d\xe0")
    return raw[:position] + b"\xfe\xff\x0d\xe1" + raw[position + 4:]


@pytest.mark.parametrize("case", sorted(broken_variants()))
def test_broken_files_fail_with_one_line(case: str) -> None:
    data = broken_variants()[case]
    with pytest.raises(ProtocolError) as info:
        check(data)
    assert "\n" not in str(info.value)
    with pytest.raises(ProtocolError):
        check(data, 7)


def test_a_deflated_data_set_is_walked_after_inflating() -> None:
    deflated = (TEST_FILES / "image_dfl.dcm").read_bytes()
    meta = parse_file_meta(deflated)
    inflated = zlib.decompressobj(-15).decompress(deflated[meta.end:])
    assert len(inflated) > 10 * len(deflated)  # it really is deflated
    assert check(deflated).dataset_uid == str(pydicom.dcmread(TEST_FILES / "image_dfl.dcm").SOPInstanceUID)
