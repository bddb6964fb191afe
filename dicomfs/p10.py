"""Reads the file meta information (group 0002) at the head of a DICOM Part 10 file.

Owns the one thing a byte stream must reveal before it can be filed: which SOP instance it is and
in which transfer syntax it is stored. Works on a prefix of the file, so a download can name an
instance after its first few hundred bytes. Must not parse the data set itself (pydicom does that).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicomfs.errors import ProtocolError

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
MAX_META_BYTES = 64 * 1024
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    end: int  # offset of the first byte after the meta group


class NeedMoreData(Exception):
    """The prefix is too short to contain the whole meta group."""


def parse_file_meta(prefix: bytes | bytearray | memoryview) -> FileMeta:
    """Parse group 0002 from ``prefix``; raise NeedMoreData if it is incomplete.

    Raises ProtocolError if the bytes are not a Part 10 file.
    """
    start = PREAMBLE_LENGTH + len(MAGIC)
    if len(prefix) < start:
        raise NeedMoreData
    if prefix[PREAMBLE_LENGTH:start] != MAGIC:
        raise ProtocolError("not a DICOM Part 10 file (no DICM prefix)")
    values: dict[int, bytes] = {}
    pos = start
    while True:
        if pos > MAX_META_BYTES:
            raise ProtocolError("DICOM file meta information is implausibly long")
        if len(prefix) < pos + 8:
            raise NeedMoreData
        group, element = struct.unpack_from("<HH", prefix, pos)
        if group != 0x0002:
            break
        vr = bytes(prefix[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if len(prefix) < pos + 12:
                raise NeedMoreData
            (length,) = struct.unpack_from("<I", prefix, pos + 8)
            value_start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", prefix, pos + 6)
            value_start = pos + 8
        if length == 0xFFFFFFFF:
            raise ProtocolError("undefined length in DICOM file meta information")
        end = value_start + length
        if end > MAX_META_BYTES:
            raise ProtocolError("DICOM file meta element is implausibly long")
        if len(prefix) < end:
            raise NeedMoreData
        values[element] = bytes(prefix[value_start:end])
        pos = end

    def text(element: int) -> str:
        return values.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    return FileMeta(
        sop_class_uid=text(0x0002),
        sop_instance_uid=text(0x0003),
        transfer_syntax_uid=text(0x0010),
        end=pos,
    )
