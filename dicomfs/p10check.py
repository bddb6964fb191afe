"""Checks, as its bytes arrive, that a stream is one well-formed DICOM Part 10 instance.

Owns the structural walk of an instance: the 128-byte preamble and ``DICM``, the file meta group
(read by ``p10``), then every top-level element of the data set in its transfer syntax (explicit or
implicit VR, little or big endian, deflated), through sequences, items and encapsulated pixel
data of undefined length, until the stream ends exactly after the last element. On the way it
reports the data set's own SOPInstanceUID (0008,0018), the name archives list an instance by,
which may differ from the one in the file meta, and keeps the short values of a few other
top-level elements a caller asks for (as stored, unparsed).

Sans-I/O and linear: values are skipped, not read (only those kept), a few header bytes are
kept between feeds, and a deflated data set is inflated in bounded steps and thrown away. Must not
interpret anything else: pydicom parses data sets.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass

from dicomfs.dicomread import DEFLATED
from dicomfs.errors import ProtocolError
from dicomfs.p10 import MAX_META_BYTES, FileMeta, NeedMoreData, parse_file_meta

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
SOP_INSTANCE_UID_TAG = 0x00080018
PIXEL_DATA_TAG = 0x7FE00010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_MAX_CAPTURE = 128  # the longest value kept (a UID has at most 64 characters)
_MAX_DEPTH = 64  # nested sequences of undefined length
_INFLATE_STEP = 1 << 20


class _Encoding:
    """Explicit or implicit VR, little or big endian, with its integer readers made once."""

    def __init__(self, explicit: bool, little: bool) -> None:
        self.explicit = explicit
        self.little = little
        order = "<" if little else ">"
        self.tag = struct.Struct(order + "HH")
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "I")


_ENCODINGS = {(explicit, little): _Encoding(explicit, little) for explicit in (True, False) for little in (True, False)}
_IMPLICIT_LITTLE = _ENCODINGS[(False, True)]
_EXPLICIT_LITTLE = _ENCODINGS[(True, True)]
_HEADER_LE = struct.Struct("<HH2sH")  # tag, VR, and the 16-bit length of a short-VR element
_U32_LE = struct.Struct("<I")


@dataclass
class _Container:
    """A sequence, item or run of pixel data fragments of undefined length being walked."""

    kind: str  # "sequence" | "item" | "fragments"
    encoding: _Encoding


class Part10Check:
    """Feed an instance's bytes in order (``feed``), then call ``finish``; either raises
    ``ProtocolError`` with a one-line reason when the bytes are not one well-formed instance."""

    def __init__(self, keep: Collection[int] = ()) -> None:
        """``keep``: top-level tags whose values (up to 128 bytes) go to ``values`` too."""
        self.meta: FileMeta | None = None
        self.dataset_uid: str | None = None  # the data set's SOPInstanceUID, once seen
        self.values: dict[int, bytes] = {}  # kept values as stored, by tag (the SOPInstanceUID's too)
        self._kept = frozenset({SOP_INSTANCE_UID_TAG, *keep})
        self._uid_decided = False  # seen, or a later top-level tag came first (it has none)
        self._head = bytearray()  # preamble and file meta, until complete
        self._inflater: zlib._Decompress | None = None
        self._encoding: _Encoding | None = None  # the data set's; None until the first element
        self._declared: _Encoding | None = None
        self._header = bytearray()  # a partial element header between feeds
        self._skip = 0  # value bytes of the current element still to pass over
        self._capture: bytearray | None = None  # the value of a kept element being collected
        self._capture_tag = 0
        self._stack: list[_Container] = []
        self._last_tag = -1  # top-level tags ascend strictly
        self._position = 0  # data set bytes walked (inflated ones for a deflated data set)
        self._inflated = 0  # a deflated data set's inflated size and CRC-32 (see the trailer)
        self._inflated_crc = 0

    def kept_uid(self, tag: int) -> str:
        """A kept UI value as text, without its padding ("" if the tag was not kept)."""
        return self.values.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")

    @property
    def identified(self) -> bool:
        """Whether the file meta and the data set's SOPInstanceUID (or its absence) are known."""
        return self.meta is not None and self._uid_decided

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.meta is None:
            # Usually the first piece holds the whole file meta: it is read in place, not copied.
            if self._head:
                self._head += data
                data = self._head
            try:
                meta = parse_file_meta(data)
            except NeedMoreData:
                if not self._head:
                    self._head += data
                if len(self._head) > MAX_META_BYTES + 16:
                    raise ProtocolError("no complete DICOM file meta information in the first 64 KiB") from None
                return
            self.meta = meta
            self._start_dataset(meta)
            data = memoryview(data)[meta.end:]
            self._head = bytearray()
        if self._inflater is not None:
            self._inflate(data)
        else:
            self._walk(memoryview(data))

    def finish(self) -> None:
        """The stream has ended: raise unless it ended exactly after a complete instance."""
        if self.meta is None:
            raise ProtocolError("too short to be a DICOM Part 10 file")
        if self._inflater is not None:
            self._inflate(b"")
            if not self._inflater.eof:
                raise ProtocolError("the deflated data set is incomplete")
            self._check_deflate_trailer(self._inflater.unused_data)
        if self._header:
            raise ProtocolError(f"the data set ends inside an element header (at byte {self._position})")
        if self._skip:
            raise ProtocolError(f"the data set ends {self._skip} bytes short of its last element's value")
        if self._stack:
            raise ProtocolError(f"the data set ends inside a {self._stack[-1].kind} of undefined length")
        self._decide_uid()

    # --- the data set -----------------------------------------------------------------------
    def _start_dataset(self, meta: FileMeta) -> None:
        syntax = meta.transfer_syntax_uid  # none named: little endian, VR told by the first element
        if syntax == IMPLICIT_LE:
            self._declared = _IMPLICIT_LITTLE
        else:
            self._declared = _ENCODINGS[(True, syntax != EXPLICIT_BE)]
        if syntax == DEFLATED:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)

    def _inflate(self, data: bytes | bytearray | memoryview) -> None:
        assert self._inflater is not None
        pending = bytes(data)
        while True:
            out = self._inflater.decompress(pending, _INFLATE_STEP)
            if out:
                self._inflated_crc = zlib.crc32(out, self._inflated_crc)
                self._inflated += len(out)
                self._walk(memoryview(out))
            pending = self._inflater.unconsumed_tail
            if not pending or self._inflater.eof:
                return

    def _check_deflate_trailer(self, extra: bytes) -> None:
        """Nothing may follow the deflated data set but one padding byte, or the 8-byte gzip
        trailer (CRC-32 and size of the inflated bytes) that some writers leave there."""
        if extra in (b"", b"\0"):
            return
        trailer = struct.pack("<II", self._inflated_crc, self._inflated & 0xFFFFFFFF)
        if extra in (trailer, trailer + b"\0"):
            return
        raise ProtocolError(f"{len(extra)} bytes follow the deflated data set")

    def _walk(self, view: memoryview) -> None:
        """Pass over ``view``: headers are parsed, values skipped (the UID kept)."""
        index, end = 0, len(view)
        while index < end:
            if self._skip:
                take = min(self._skip, end - index)
                if self._capture is not None:
                    self._capture += view[index:index + take]
                index += take
                self._skip -= take
                self._position += take
                if not self._skip and self._capture is not None:
                    self._keep(self._capture_tag, bytes(self._capture))
                continue
            if self._header:  # a header split across feeds: complete it (8 bytes tell if it has 12)
                want = 8 if len(self._header) < 8 else 12
                take = min(want - len(self._header), end - index)
                self._header += view[index:index + take]
                index += take
                if len(self._header) >= 8 and self._element(self._header, 0, len(self._header)):
                    self._header = bytearray()
                continue
            if not self._stack and self._encoding is _EXPLICIT_LITTLE:
                index = self._run(view, index, end)  # the common case, in a tight loop
                if self._skip or index >= end:
                    continue
            used = self._element(view, index, end)
            if used:
                index += used
            else:  # the rest of this piece is the start of a header
                self._header += view[index:end]
                index = end

    def _run(self, view: memoryview, index: int, end: int) -> int:
        """Pass over top-level explicit VR little endian elements of defined length, as many as
        follow one another in ``view``; stop (for ``_element`` to take over) at anything else:
        a delimiter, a sequence, an element kept, a tag out of order, a header cut short."""
        start, last, kept = index, self._last_tag, self._kept
        unpack, unpack_long = _HEADER_LE.unpack_from, _U32_LE.unpack_from
        while end - index >= 12:
            group, element, vr, length = unpack(view, index)
            tag = group << 16 | element
            if tag <= last or tag in kept or group == 0xFFFE:
                break
            if vr in _LONG_VRS:
                length = unpack_long(view, index + 8)[0]
                if length == UNDEFINED:
                    break
                index += 12
            elif vr.isalpha() and vr.isupper():
                index += 8
            else:
                break
            last = tag
            if index + length > end:
                self._skip = index + length - end
                index = end
                break
            index += length
        self._position += index - start
        if last != self._last_tag:
            self._last_tag = last
            if last > SOP_INSTANCE_UID_TAG and self.dataset_uid is None:
                self._uid_decided = True
        return index

    def _current(self) -> _Encoding:
        if self._stack:
            return self._stack[-1].encoding
        if self._encoding is None:
            raise AssertionError("no encoding before the first element")
        return self._encoding

    def _detect(self, buf: bytes | bytearray | memoryview, pos: int) -> _Encoding:
        """The first element tells explicit from implicit VR, as pydicom does: files that declare
        one and use the other exist."""
        assert self._declared is not None
        vr = bytes(buf[pos + 4:pos + 6])
        return _ENCODINGS[(vr.isalpha() and vr.isupper(), self._declared.little)]

    def _element(self, buf: bytes | bytearray | memoryview, pos: int, end: int) -> int:
        """Read the element header at ``buf[pos:end]``: how many bytes it took, or 0 if it is not
        all there yet."""
        if end - pos < 8:
            return 0
        if self._encoding is None:
            self._encoding = self._detect(buf, pos)
        encoding = self._stack[-1].encoding if self._stack else self._encoding
        group, element = encoding.tag.unpack_from(buf, pos)
        if group == 0xFFFE:
            self._delimiter(group << 16 | element, encoding.u32.unpack_from(buf, pos + 4)[0])
            self._position += 8
            return 8
        top = self._stack[-1] if self._stack else None
        if top is not None and top.kind != "item":
            raise ProtocolError(f"element ({group:04X},{element:04X}) where a {top.kind} item was expected "
                                f"(at byte {self._position})")
        vr = b""
        if encoding.explicit:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if end - pos < 12:
                    return 0
                length, used = encoding.u32.unpack_from(buf, pos + 8)[0], 12
            elif vr.isalpha() and vr.isupper():
                length, used = encoding.u16.unpack_from(buf, pos + 6)[0], 8
            else:
                raise ProtocolError(f"element ({group:04X},{element:04X}) has no valid VR "
                                    f"(at byte {self._position})")
        else:
            length, used = encoding.u32.unpack_from(buf, pos + 4)[0], 8
        self._position += used
        tag = group << 16 | element
        if top is None:
            self._top_level(tag)
        if length == UNDEFINED:
            self._open(tag, vr, encoding)
            return used
        if top is None and tag in self._kept and length <= _MAX_CAPTURE:
            self._capture, self._capture_tag = bytearray(), tag
            if length == 0:
                self._keep(tag, b"")
        self._skip = length
        return used

    def _top_level(self, tag: int) -> None:
        if tag <= self._last_tag:
            raise ProtocolError(f"data set element ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order "
                                f"(at byte {self._position})")
        self._last_tag = tag
        if tag > SOP_INSTANCE_UID_TAG and self.dataset_uid is None:
            self._uid_decided = True  # the data set has none

    def _open(self, tag: int, vr: bytes, encoding: _Encoding) -> None:
        """An element of undefined length: a sequence, or encapsulated pixel data."""
        if len(self._stack) >= _MAX_DEPTH:
            raise ProtocolError(f"sequences nested deeper than {_MAX_DEPTH} levels")
        if vr in (b"OB", b"OW") or (not encoding.explicit and tag == PIXEL_DATA_TAG):
            self._stack.append(_Container("fragments", encoding))
        elif vr == b"SQ" or not encoding.explicit:
            self._stack.append(_Container("sequence", encoding))
        elif vr == b"UN":  # PS3.5 6.2.2: its items are encoded in implicit VR little endian
            self._stack.append(_Container("sequence", _IMPLICIT_LITTLE))
        else:
            raise ProtocolError(f"undefined length on a {vr.decode('ascii')} element (at byte {self._position})")

    def _delimiter(self, tag: int, length: int) -> None:
        top = self._stack[-1] if self._stack else None
        where = f"(at byte {self._position})"
        if tag == ITEM:
            if top is None or top.kind == "item":
                raise ProtocolError(f"an item outside a sequence {where}")
            if length == UNDEFINED:
                if top.kind == "fragments":
                    raise ProtocolError(f"a pixel data fragment of undefined length {where}")
                if len(self._stack) >= _MAX_DEPTH:
                    raise ProtocolError(f"sequences nested deeper than {_MAX_DEPTH} levels")
                self._stack.append(_Container("item", top.encoding))
            else:
                self._skip = length
        elif tag == ITEM_END:
            if top is None or top.kind != "item":
                raise ProtocolError(f"an item delimiter outside an item {where}")
            self._stack.pop()
        elif tag == SEQUENCE_END:
            if top is None or top.kind == "item":
                raise ProtocolError(f"a sequence delimiter outside a sequence {where}")
            self._stack.pop()
        else:
            raise ProtocolError(f"unknown delimiter tag (FFFE,{tag & 0xFFFF:04X}) {where}")

    def _keep(self, tag: int, value: bytes) -> None:
        self._capture = None
        self.values[tag] = value
        if tag == SOP_INSTANCE_UID_TAG:
            self.dataset_uid = self.kept_uid(tag)
            self._uid_decided = True

    def _decide_uid(self) -> None:
        self._uid_decided = True
